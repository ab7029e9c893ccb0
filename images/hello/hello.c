/* hello: the smallest useful microvmd guest (plain WASI, no SDK).
 *
 * Prints a greeting, its arguments, and the WHO environment variable, then
 * exits with the integer code given as its first argument (default 0).  Used
 * by tests to check argv/env plumbing and exit-code propagation.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    printf("Hello from microvmd!\n");
    for (int i = 1; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);
    const char *who = getenv("WHO");
    if (who)
        printf("WHO=%s\n", who);
    else
        printf("WHO is unset\n");
    fflush(stdout);
    return argc > 1 ? atoi(argv[1]) : 0;
}
