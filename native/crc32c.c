/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * Chosen over xxh3 for record checksums because it needs no vendored code,
 * has a hardware instruction on x86-64 (SSE4.2) and guarantees detection of
 * every burst error up to 32 bits; measured figures are in docs/benchmarks.md.
 * cdp_crc32c(0, buf, len) is the standard CRC32C; passing a previous result
 * continues it over more bytes.
 *
 * Three implementations, picked at run time: carry-less multiply folding on
 * CPUs with VPCLMULQDQ and AVX-512 (about 50-65 GB/s), three interleaved
 * crc32-instruction streams on other SSE4.2 CPUs (about 16 GB/s, against 5.5
 * for one stream), and slicing-by-8 elsewhere (about 1 GB/s). Every byte the
 * journal writes is checksummed, and at 64 KiB per record one stream cost
 * half as much as the kernel's copy into the page cache (docs/benchmarks.md).
 */
#include "cdp.h"
#include <string.h>

static uint32_t table[8][256];
static int table_ready;
static int use_hw = -1;

static void build_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
    table_ready = 1;
}

/* Slicing-by-8: the portable fallback. */
static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n)
{
    if (!table_ready)
        build_table();
    while (n && ((uintptr_t)p & 7)) {
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^
            table[5][(v >> 16) & 0xff] ^ table[4][(v >> 24) & 0xff] ^
            table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
            table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
#include <immintrin.h>
#include <pthread.h>

/* One dependent stream of the crc32 instruction runs at 8 bytes per 3
 * cycles (its latency); the unit accepts one per cycle. Long buffers are
 * therefore cut into three blocks checksummed side by side, and the three
 * partial CRCs are joined with a "shift over len zero bytes" operator. */
enum { SHORT_BLOCK = 256, LONG_BLOCK = 4096 };
static uint32_t shift_short[4][256], shift_long[4][256];
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* The CRC register after len zero bytes is a linear map of the register
 * before; t[k][v] is the image of byte k of the register holding v. */
__attribute__((target("sse4.2")))
static void build_shift(uint32_t t[4][256], size_t len)
{
    uint32_t col[32];
    for (int i = 0; i < 32; i++) {
        uint64_t c = (uint64_t)1 << i;
        for (size_t k = 0; k < len / 8; k++)
            c = _mm_crc32_u64(c, 0);
        col[i] = (uint32_t)c;
    }
    for (int k = 0; k < 4; k++)
        for (int v = 0; v < 256; v++) {
            uint32_t r = 0;
            for (int b = 0; b < 8; b++)
                if ((v >> b) & 1)
                    r ^= col[8 * k + b];
            t[k][v] = r;
        }
}

static void build_shifts(void)
{
    build_shift(shift_short, SHORT_BLOCK);
    build_shift(shift_long, LONG_BLOCK);
}

static inline uint32_t shift(const uint32_t t[4][256], uint32_t c)
{
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

/* CRC of the 3 * block bytes at p, continuing register *c. */
__attribute__((target("sse4.2")))
static inline const uint8_t *crc_3way(uint64_t *c, const uint8_t *p, size_t block,
                                      const uint32_t t[4][256])
{
    uint64_t c0 = *c, c1 = 0, c2 = 0;
    const uint8_t *end = p + block;
    do {
        uint64_t a, b, d;
        memcpy(&a, p, 8);
        memcpy(&b, p + block, 8);
        memcpy(&d, p + 2 * block, 8);
        c0 = _mm_crc32_u64(c0, a);
        c1 = _mm_crc32_u64(c1, b);
        c2 = _mm_crc32_u64(c2, d);
        p += 8;
    } while (p < end);
    c0 = shift(t, (uint32_t)c0) ^ c1;
    *c = shift(t, (uint32_t)c0) ^ c2;
    return p + 2 * block;
}

/* On CPUs with VPCLMULQDQ (carry-less multiply on 512-bit vectors), the
 * buffer is folded 256 bytes at a time into four 512-bit accumulators:
 * each 128-bit lane L of the message is replaced by L.lo * (x^(D+32) mod P)
 * + L.hi * (x^(D-32) mod P), a polynomial congruent to it moved D bits
 * further, and added to the data there. What remains is 16 bytes that have
 * the CRC of everything before them; the crc32 instruction finishes. */
static int use_fold = -1;
static uint64_t k_fold[5][2]; /* D = 2048, 512, 384, 256, 128 bits: {lo, hi} */

/* reflect32(x^k mod P) << 1: the multiplier for the reflected domain. */
static uint64_t fold_const(unsigned k)
{
    uint64_t r = 1;
    for (unsigned i = 0; i < k; i++) {
        r <<= 1;
        if (r >> 32)
            r ^= 0x11EDC6F41u; /* CRC32C polynomial, not reflected */
    }
    uint64_t v = 0;
    for (int i = 0; i < 32; i++)
        if ((r >> i) & 1)
            v |= (uint64_t)1 << (31 - i);
    return v << 1;
}

static void build_fold(void)
{
    static const unsigned dist[5] = {2048, 512, 384, 256, 128};
    for (int i = 0; i < 5; i++) {
        k_fold[i][0] = fold_const(dist[i] + 32);
        k_fold[i][1] = fold_const(dist[i] - 32);
    }
}

#define FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

FOLD_TARGET static inline __m512i fold512(__m512i x, __m512i k, __m512i d)
{
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                     _mm512_clmulepi64_epi128(x, k, 0x11), d, 0x96);
}

FOLD_TARGET static inline __m128i fold128(__m128i x, const uint64_t k[2], __m128i d)
{
    __m128i kk = _mm_set_epi64x((long long)k[1], (long long)k[0]);
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, kk, 0x00),
                                       _mm_clmulepi64_si128(x, kk, 0x11)), d);
}

/* n >= 256; consumes n rounded down to 16 bytes. */
FOLD_TARGET static uint64_t crc_fold(uint64_t c, const uint8_t **pp, size_t *np)
{
    const uint8_t *p = *pp;
    size_t n = *np;
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p),
                                  _mm512_inserti32x4(_mm512_setzero_si512(),
                                                     _mm_cvtsi32_si128((int)(uint32_t)c), 0));
    __m512i x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128),
            x3 = _mm512_loadu_si512(p + 192);
    p += 256;
    n -= 256;
    __m512i k = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)k_fold[0][1], (long long)k_fold[0][0]));
    for (; n >= 256; p += 256, n -= 256) {
        x0 = fold512(x0, k, _mm512_loadu_si512(p));
        x1 = fold512(x1, k, _mm512_loadu_si512(p + 64));
        x2 = fold512(x2, k, _mm512_loadu_si512(p + 128));
        x3 = fold512(x3, k, _mm512_loadu_si512(p + 192));
    }
    k = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)k_fold[1][1], (long long)k_fold[1][0]));
    x1 = fold512(x0, k, x1);
    x2 = fold512(x1, k, x2);
    x3 = fold512(x2, k, x3);
    __m128i x = fold128(_mm512_extracti32x4_epi32(x3, 0), k_fold[2],
                        _mm512_extracti32x4_epi32(x3, 3));
    x = fold128(_mm512_extracti32x4_epi32(x3, 1), k_fold[3], x);
    x = fold128(_mm512_extracti32x4_epi32(x3, 2), k_fold[4], x);
    for (; n >= 16; p += 16, n -= 16)
        x = fold128(x, k_fold[4], _mm_loadu_si128((const __m128i *)p));
    c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    c = _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(x, 1));
    *pp = p;
    *np = n;
    return c;
}

static void crc_init(void)
{
    build_shifts();
    build_fold();
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t c, const uint8_t *p, size_t n)
{
    uint64_t c64 = c;
    while (n && ((uintptr_t)p & 7)) {
        c64 = _mm_crc32_u8((uint32_t)c64, *p++);
        n--;
    }
    if (n >= 512 && use_fold > 0) {
        pthread_once(&init_once, crc_init);
        c64 = crc_fold(c64, &p, &n);
    }
    if (n >= 3 * SHORT_BLOCK) {
        pthread_once(&init_once, crc_init);
        for (; n >= 3 * LONG_BLOCK; n -= 3 * LONG_BLOCK)
            p = crc_3way(&c64, p, LONG_BLOCK, shift_long);
        for (; n >= 3 * SHORT_BLOCK; n -= 3 * SHORT_BLOCK)
            p = crc_3way(&c64, p, SHORT_BLOCK, shift_short);
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c64 = _mm_crc32_u8((uint32_t)c64, *p++);
    return (uint32_t)c64;
}
#endif

int cdp_crc32c_hw(void)
{
    if (use_hw < 0) {
#if defined(__x86_64__)
        __builtin_cpu_init();
        use_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        use_fold = use_hw && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul");
#else
        use_hw = 0;
#endif
    }
    return use_hw;
}

int cdp_crc32c_level(int level)
{
    cdp_crc32c_hw();
    int before = use_hw > 0 ? (use_fold > 0 ? 2 : 1) : 0;
    if (level >= 0) {
        static int detected_fold = -1;
        if (detected_fold < 0)
            detected_fold = use_fold > 0;
#if defined(__x86_64__)
        use_hw = level >= 1 && __builtin_cpu_supports("sse4.2");
#endif
        use_fold = level >= 2 && use_hw && detected_fold;
    }
    return before;
}

uint32_t cdp_crc32c(uint32_t crc, const void *buf, size_t len)
{
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (cdp_crc32c_hw())
        return ~crc_hw(c, (const uint8_t *)buf, len);
#endif
    return ~crc_sw(c, (const uint8_t *)buf, len);
}
