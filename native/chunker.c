/* Content-defined chunking (FastCDC, Xia et al., 2016/2020): where to cut a
 * byte stream so that an insertion or deletion moves only the cuts near it,
 * and identical content yields identical chunks wherever it sits (the
 * replication's dedupe rests on that).
 *
 * A rolling "gear" fingerprint fp = (fp << 1) + gear[byte] is tested at each
 * position against a mask; a position where fp & mask == 0 is a cut. Three
 * things from FastCDC keep it fast and the sizes tight:
 *   - no test before min bytes (cut-point skipping);
 *   - normalized chunking: a mask with 2 more bits (harder) before the
 *     average size and 2 fewer (easier) after it, so sizes cluster round avg;
 *   - two bytes per step: fp advanced by a table of gear values shifted left
 *     once and a mask shifted left once tests the first of the two bytes
 *     (the "rolling two bytes" form), halving the loop's branches.
 * The gear table comes from splitmix64 with a fixed seed: chunk boundaries
 * are part of the vault's contract (dedupe across versions), so the table
 * and the masks below must never change; tests/test_chunking.py pins them. */
#include "cdp.h"
#include <string.h>

static uint64_t gear[256], gear_ls[256];
static int gear_ready;

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void init_gear(void)
{
    if (__atomic_load_n(&gear_ready, __ATOMIC_ACQUIRE))
        return;
    uint64_t s = 0x6364706368756e6bull;  /* "cdpchunk" */
    for (int i = 0; i < 256; i++) {
        gear[i] = splitmix64(&s);
        gear_ls[i] = gear[i] << 1;
    }
    __atomic_store_n(&gear_ready, 1, __ATOMIC_RELEASE);
}

/* A mask of `bits` one-bits spread over bits 62..15 of the word (the high
 * bits of fp depend on the most recent 64 bytes; spreading them keeps the
 * cut probability 2^-bits without favouring short periodic content). Bit
 * 63 stays clear so that mask << 1 loses nothing: the two-bytes-per-step
 * test of the first byte is then exactly the one-byte test. */
static uint64_t spread_mask(int bits)
{
    uint64_t m = 0;
    for (int i = 0; i < bits; i++)
        m |= 1ull << (62 - (i * 48) / bits);
    return m;
}

uint64_t cdp_chunk_mask(int bits)
{
    return bits > 0 && bits <= 48 ? spread_mask(bits) : 0;
}

int cdp_chunk(const uint8_t *buf, uint64_t len, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
              int last, uint64_t *cuts, uint64_t cap, uint64_t *n_cuts)
{
    if (!n_cuts || min_size < 64 || avg_size <= min_size || max_size <= avg_size || max_size > (1u << 30) ||
        (avg_size & (avg_size - 1)))
        return CDP_EINVAL;
    init_gear();
    int bits = 0;
    while ((1u << bits) < avg_size)
        bits++;
    const uint64_t mask_s = spread_mask(bits + 2), mask_l = spread_mask(bits - 2);
    const uint64_t mask_s_ls = mask_s << 1, mask_l_ls = mask_l << 1;
    uint64_t pos = 0, n = 0;
    *n_cuts = 0;
    while (pos < len && n < cap) {
        uint64_t left = len - pos;
        if (left <= min_size) {
            if (last)  /* the stream's tail: a short last chunk */
                cuts[n++] = len;
            break;     /* else it may still grow: the caller feeds more */
        }
        const uint8_t *p = buf + pos;
        uint64_t end = left < max_size ? left : max_size;
        uint64_t normal = avg_size < end ? avg_size : end;
        uint64_t i = min_size, fp = 0, cut;
        /* two bytes per step, with the harder mask up to the average size */
        for (; i + 2 <= normal; i += 2) {
            fp = (fp << 2) + gear_ls[p[i]];
            if (!(fp & mask_s_ls)) { cut = i + 1; goto found; }
            fp += gear[p[i + 1]];
            if (!(fp & mask_s)) { cut = i + 2; goto found; }
        }
        if (i < normal && i + 1 < end) {  /* an odd byte before the average: the harder mask */
            fp = (fp << 1) + gear[p[i]];
            if (!(fp & mask_s)) { cut = i + 1; goto found; }
            i++;
        }
        for (; i + 2 <= end; i += 2) {
            fp = (fp << 2) + gear_ls[p[i]];
            if (!(fp & mask_l_ls)) { cut = i + 1; goto found; }
            fp += gear[p[i + 1]];
            if (!(fp & mask_l)) { cut = i + 2; goto found; }
        }
        if (i < end) {  /* one byte left before end */
            fp = (fp << 1) + gear[p[i]];
            if (!(fp & (i < normal ? mask_s : mask_l))) { cut = i + 1; goto found; }
        }
        /* no content cut: at max_size, or at the end of the stream; short
         * of both, the cut depends on bytes not seen yet */
        if (end < max_size && !last)
            break;
        cut = end;
    found:
        pos += cut;
        cuts[n++] = pos;
    }
    *n_cuts = n;
    return CDP_OK;
}
