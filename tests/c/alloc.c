/* Allocate and touch N MiB, then optionally sleep S seconds; print "ok". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
    unsigned secs = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 10) : 0;
    size_t len = mib << 20;
    char *p = malloc(len);
    if (!p) { perror("malloc"); return 2; }
    for (size_t i = 0; i < len; i += 4096) p[i] = 1;
    if (secs) sleep(secs);
    puts("ok");
    return 0;
}
