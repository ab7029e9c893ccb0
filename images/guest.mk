# Shared rules for the sample guests. images/<name>/Makefile sets GUEST (builds <name>.wasm from <name>.c)
# and GUEST_KIND, then includes this file:
#
#   GUEST_KIND = wasi   plain WASI guest, no SDK:
#                       $(CC) --target=wasm32-wasi --sysroot=/usr $(CFLAGS)    CC = clang, CFLAGS ?= -O2 -Wall -Wextra
#   GUEST_KIND = mvcc   guest SDK guest, Asyncify on:
#                       ../../guest-sdk/mvcc $(CFLAGS)                         CFLAGS ?= -Wall -Wextra
#
# scripts/build-guests and tests/test_guests_build.py tell SDK guests by "mvcc" in the guest's own Makefile.
# Targets: all (default), clean.

ifeq ($(strip $(GUEST)),)
$(error set GUEST = <name> before including guest.mk)
endif

all: $(GUEST).wasm

ifeq ($(GUEST_KIND),mvcc)
MVCC ?= ../../guest-sdk/mvcc
SDK = ../../guest-sdk
SDK_DEPS = $(SDK)/mvcc $(SDK)/include/microvm.h $(SDK)/src/microvm.c
CFLAGS ?= -Wall -Wextra

$(GUEST).wasm: $(GUEST).c $(SDK_DEPS)
	$(MVCC) $(CFLAGS) -o $@ $<
else ifeq ($(GUEST_KIND),wasi)
CC ?= clang
ifeq ($(origin CC),default)
CC = clang
endif
CFLAGS ?= -O2 -Wall -Wextra
WASI_FLAGS = --target=wasm32-wasi --sysroot=/usr

$(GUEST).wasm: $(GUEST).c
	$(CC) $(WASI_FLAGS) $(CFLAGS) -o $@ $<
else
$(error GUEST_KIND must be wasi or mvcc, not "$(GUEST_KIND)")
endif

clean:
	rm -f $(GUEST).wasm

.PHONY: all clean
