/* fnsdk: a sample function for the SDK executor (microvm fn deploy hi fnsdk --executor sdk).
 *
 * The request and the response pass through linear memory (guest-sdk/ABI.md, module microvm_fn). What
 * runs before mv_fn_request() (here: the table below) is done once, at deploy, and every request starts
 * from a copy of it: `calls` is 1 in every answer. ?trap=1 traps, ?silent=1 returns without answering,
 * ?sleep=1 sleeps 10 ms first (a request that waits: it runs as a VM, not as a direct instance).
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "microvm.h"

static int calls;
static char table[256];

static int handle(const struct mv_fn_request *req) {
    calls++;
    if (strstr(req->query, "trap=1")) __builtin_trap();
    if (strstr(req->query, "silent=1")) return 0;
    if (strstr(req->query, "sleep=1")) usleep(10000);
    char body[1024];
    const char *agent = mv_fn_header(req, "user-agent");
    int n = snprintf(body, sizeof body, "sdk %s %s?%s %zu bytes, call %d, agent %s, table %d\n", req->method,
                     req->path, req->query, req->body_len, calls, agent ? agent : "-", table[255]);
    return mv_fn_respond(200, "Content-Type: text/plain\nX-Sdk: 1", body, (size_t)n) < 0;
}

static int init_then_serve(void) {
    for (int i = 0; i < 256; i++) table[i] = (char)(i % 7);  /* "initialisation", done once at deploy */
    struct mv_fn_request req;
    if (mv_fn_request(&req) < 0) return 1;
    return handle(&req);
}

int main(void) { return init_then_serve(); }
