/* Spin T threads until each has used S seconds of its own CPU time
   (CLOCK_THREAD_CPUTIME_ID), so the total is T*S however busy the host is. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static double secs;

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *spin(void *arg) {
    (void)arg;
    volatile unsigned long x = 0;
    while (cpu_now() < secs) x++;
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    secs = argc > 2 ? atof(argv[2]) : 1.0;
    pthread_t t[64];
    for (int i = 0; i < n && i < 64; i++) pthread_create(&t[i], NULL, spin, NULL);
    for (int i = 0; i < n && i < 64; i++) pthread_join(t[i], NULL);
    return 0;
}
