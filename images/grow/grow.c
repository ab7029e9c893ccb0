/* grow: a memory-hungry guest for memory-limit tests.
 *
 * Allocates 1 MiB at a time with malloc and touches every byte (memset) until
 * malloc fails, then prints `got <N> MiB` as the final line and exits 0.  The
 * 4096 MiB cap (the whole wasm32 address space) guarantees termination even
 * when the host sets no memory limit.  Blocks are deliberately never freed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1024 * 1024)
#define CAP_MIB 4096

/* Every block is published here so the compiler cannot prove the
 * allocations dead and elide malloc+memset (clang does, otherwise). */
static char *volatile blocks[CAP_MIB];

int main(void) {
    unsigned n = 0;
    while (n < CAP_MIB) {
        char *p = malloc(MIB);
        if (!p)
            break;
        memset(p, (int)(n & 0xff) | 1, MIB);
        blocks[n] = p;
        n++;
    }
    /* Read one byte back from each block: the memory really is committed. */
    unsigned check = 0;
    for (unsigned i = 0; i < n; i++)
        check += (unsigned char)blocks[i][MIB - 1];
    printf("touched %u blocks (check %u)\n", n, check);
    printf("got %u MiB\n", n);
    return 0;
}
