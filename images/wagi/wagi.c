/* wagi: a sample function for the WAGI executor (CGI/1.1 over WASI; docs/functions.md).
 *
 *   microvm fn deploy hello wagi --route /hello        (wagi is the default executor for an image)
 *   curl 'http://127.0.0.1:8080/hello?name=ada'        -> hello ada
 *   curl -d 'some body' http://127.0.0.1:8080/hello    -> 201, got 9 bytes
 *
 * The request comes as the environment (REQUEST_METHOD, QUERY_STRING, PATH_INFO, HTTP_* headers...) and the
 * body on stdin; the answer goes to stdout as CGI headers, an empty line, then the body. A few queries make
 * it misbehave on purpose, for the tests: spin (never answers), trap (a Wasm trap), nohead (no CGI headers),
 * env (prints the CGI environment).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

static int calls; /* module state: every request runs in a fresh instance, so this is always 1 */

static const char *param(const char *query, const char *key) {
    static char value[256];
    size_t n = strlen(key);
    for (const char *p = query; p && *p; ) {
        if (strncmp(p, key, n) == 0 && (p[n] == '=' || p[n] == '&' || p[n] == 0)) {
            const char *v = p[n] == '=' ? p + n + 1 : p + n;
            size_t len = strcspn(v, "&");
            if (len >= sizeof value) len = sizeof value - 1;
            memcpy(value, v, len);
            value[len] = 0;
            return value;
        }
        p = strchr(p, '&');
        if (p) p++;
    }
    return NULL;
}

int main(void) {
    calls++;
    const char *method = getenv("REQUEST_METHOD"), *query = getenv("QUERY_STRING");
    if (param(query, "spin")) { volatile unsigned long x = 0; for (;;) x++; }
    if (param(query, "trap")) __builtin_trap();
    if (param(query, "nohead")) { printf("no headers here\n"); return 0; }
    if (param(query, "env")) {
        printf("Content-Type: text/plain\n\n");
        for (char **e = environ; *e; e++) printf("%s\n", *e);
        return 0;
    }
    if (method && strcmp(method, "POST") == 0) {
        char buf[4096];
        size_t n = 0, r;
        while ((r = fread(buf, 1, sizeof buf, stdin)) > 0) n += r;
        printf("Content-Type: text/plain\nStatus: 201 Created\n\ngot %zu bytes, call %d\n", n, calls);
        return 0;
    }
    const char *name = param(query, "name");
    const char *agent = getenv("HTTP_USER_AGENT");
    fprintf(stderr, "wagi: %s %s (agent %s)\n", method ? method : "?", query ? query : "", agent ? agent : "-");
    printf("Content-Type: text/plain\nX-Calls: %d\n\nhello %s, call %d\n", calls, name ? name : "world", calls);
    return 0;
}
