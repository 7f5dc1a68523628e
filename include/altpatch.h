/* altpatch.h: the C side of altpatch for programs and kernels linking the
 * crate: the published CPU feature snapshot, for ifunc resolvers (which
 * take no arguments), and JIT-free trampolines. The feature numbers are
 * generated from src/arch/x86_64/cpu/feature.rs; tests/ifunc.rs checks that they
 * match, tests/trampoline.rs that the trampoline functions exist. */
#ifndef ALTPATCH_H
#define ALTPATCH_H

/* Whether the published snapshot has feature ALTPATCH_CPU_<NAME>: 1 or 0.
 * Publishes the detected snapshot first if the program published none. */
int altpatch_cpu_has(unsigned feature);

/* The published snapshot's feature bits: bit n is feature number n. */
unsigned long long altpatch_cpu_features(void);

/* JIT-free trampolines (Linux, the crate's default `std` feature): a fresh
 * code address that jumps to TARGET with DATA in %r10 and every other
 * register, the stack and the return address exactly as the caller left
 * them (%r10 is the SysV static-chain register: caller-saved, never an
 * argument). The code is a read+exec copy of a pre-assembled page mapped
 * from altpatch's own file; nothing is written to code and no mapping is
 * ever writable and executable, so it works under PR_SET_MDWE and
 * vm.memfd_noexec=2. Each trampoline starts with endbr64.
 * Returns NULL with errno set on failure. Thread-safe and lock-free. */
void *altpatch_trampoline_alloc(void (*target)(void), void *data);

/* Gives back a trampoline from altpatch_trampoline_alloc, which nobody may
 * call any more (a stray call aborts with a message until it is reused).
 * Returns 0, or -1 with errno = EINVAL for anything else. */
int altpatch_trampoline_free(void *code);

#define ALTPATCH_CPU_SSE3 0
#define ALTPATCH_CPU_PCLMULQDQ 1
#define ALTPATCH_CPU_SSSE3 2
#define ALTPATCH_CPU_FMA 3
#define ALTPATCH_CPU_SSE4_1 4
#define ALTPATCH_CPU_SSE4_2 5
#define ALTPATCH_CPU_MOVBE 6
#define ALTPATCH_CPU_POPCNT 7
#define ALTPATCH_CPU_AES 8
#define ALTPATCH_CPU_XSAVE 9
#define ALTPATCH_CPU_AVX 10
#define ALTPATCH_CPU_F16C 11
#define ALTPATCH_CPU_RDRAND 12
#define ALTPATCH_CPU_HYPERVISOR 13
#define ALTPATCH_CPU_BMI1 14
#define ALTPATCH_CPU_AVX2 15
#define ALTPATCH_CPU_BMI2 16
#define ALTPATCH_CPU_ERMS 17
#define ALTPATCH_CPU_AVX512F 18
#define ALTPATCH_CPU_AVX512DQ 19
#define ALTPATCH_CPU_RDSEED 20
#define ALTPATCH_CPU_ADX 21
#define ALTPATCH_CPU_CLFLUSHOPT 22
#define ALTPATCH_CPU_CLWB 23
#define ALTPATCH_CPU_SHA 24
#define ALTPATCH_CPU_AVX512BW 25
#define ALTPATCH_CPU_AVX512VL 26
#define ALTPATCH_CPU_RDPID 27
#define ALTPATCH_CPU_FSRM 28
#define ALTPATCH_CPU_MD_CLEAR 29
#define ALTPATCH_CPU_SERIALIZE 30
#define ALTPATCH_CPU_IBRS 31
#define ALTPATCH_CPU_IBPB 32
#define ALTPATCH_CPU_STIBP 33
#define ALTPATCH_CPU_ARCH_CAPABILITIES 34
#define ALTPATCH_CPU_SSBD 35
#define ALTPATCH_CPU_LZCNT 36
#define ALTPATCH_CPU_RDTSCP 37
#define ALTPATCH_CPU_AUTO_IBRS 38
#define ALTPATCH_CPU_EIBRS 39
#define ALTPATCH_CPU_BUS_LOCK_DETECT 40
#define ALTPATCH_CPU_ITS_NO 41
#define ALTPATCH_CPU_LFENCE_SERIALIZING 48
#define ALTPATCH_CPU_RETPOLINE_NEEDED 49

#endif
