/* Burn S seconds of CPU time (not wall time), then exit 0. */
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 1.0;
    volatile unsigned long x = 0;
    for (;;) {
        for (int i = 0; i < 1000000; i++) x++;
        if ((double)clock() / CLOCKS_PER_SEC >= secs) return 0;
    }
}
