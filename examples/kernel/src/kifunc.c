/* A C ifunc in the freestanding kernel, the way C code declares one: GCC's
 * ifunc attribute. The linker turns it into an R_X86_64_IRELATIVE entry
 * (between __rela_iplt_start and __rela_iplt_end) and sends every call
 * through a PLT stub; the kernel resolves it at boot with
 * altpatch::ifunc::process_irelative and makes the calls direct with
 * altpatch::ifunc::apply_plt_sites. The resolver reads the snapshot altpatch
 * published (no __builtin_cpu_supports here: no libgcc, no cpu model
 * initialization in a freestanding image). */
#include "altpatch.h"

typedef unsigned long (*ones_fn)(unsigned long);

static unsigned long c_ones_portable(unsigned long x)
{
    unsigned long n = 0;
    while (x) {
        x &= x - 1;
        n++;
    }
    return n;
}

/* Tagged (+2000) so the boot log shows which one ran. */
static unsigned long c_ones_avx2(unsigned long x)
{
    return 2000 + __builtin_popcountl(x);
}

static ones_fn resolve_c_ones(void)
{
    return altpatch_cpu_has(ALTPATCH_CPU_AVX2) ? c_ones_avx2 : c_ones_portable;
}

unsigned long c_ones(unsigned long x) __attribute__((ifunc("resolve_c_ones")));

/* Two PLT-bound call sites (`call c_ones@plt`). */
unsigned long c_ones_twice(unsigned long x)
{
    return c_ones(x) + c_ones(x >> 1);
}
