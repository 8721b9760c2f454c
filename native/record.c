/* Record validation and segment scanning: the loop that verification,
 * recovery of a torn tail and sparse-index building all share. Pure
 * functions over (pointer, length); no I/O, no policy. */
#include "cdp.h"
#include "le.h"
#include <string.h>
#include <time.h>

const char *cdp_strerror(int status)
{
    switch (status) {
    case CDP_OK: return "ok";
    case CDP_EIO: return "system call failed";
    case CDP_EINVAL: return "invalid argument or malformed record buffer";
    case CDP_ETOOBIG: return "record payload larger than 16 MiB";
    case CDP_ESTALE: return "namespace changed by another writer";
    case CDP_ECORRUPT: return "journal head state is damaged";
    case CDP_ENOMEM: return "out of memory";
    }
    return "unknown status";
}

int64_t cdp_now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

void cdp_segment_header(uint8_t *b, const uint8_t *uuid, uint64_t seg_no,
                        uint64_t first_seq, int64_t created_us)
{
    memset(b, 0, CDP_SEG_HDR_SIZE);
    memcpy(b, "CDPJSEG\0", 8);
    b[8] = 1;                       /* format version, u16 LE */
    b[10] = CDP_SEG_HDR_SIZE;       /* header size, u16 LE */
    memcpy(b + 16, uuid, 16);
    wr64(b + 32, seg_no);
    wr64(b + 40, first_seq);
    wr64(b + 48, (uint64_t)created_us);
    wr32(b + 60, cdp_crc32c(0, b, 60));
}

/* Checks one record at p (avail bytes available); returns a cdp_stop code
 * other than END on failure, CDP_STOP_END on success with *size set. */
static int check_record_crc(const uint8_t *p, uint64_t avail, uint64_t *size, int check_crc)
{
    if (avail < CDP_REC_HDR_SIZE)
        return CDP_STOP_SHORT;
    uint32_t len = rd32(p + 4);
    uint8_t kind = p[40];
    if (rd16(p + 42) != CDP_REC_MARKER || rd32(p + 44) != 0 || kind == 0 ||
        kind > CDP_MAX_KIND || len > CDP_MAX_PAYLOAD)
        return CDP_STOP_MARKER;
    uint64_t body = (uint64_t)CDP_REC_HDR_SIZE + len;
    uint64_t total = (body + 7) & ~(uint64_t)7;
    if (avail < total)
        return CDP_STOP_SHORT;
    if (check_crc) {
        if (cdp_crc32c(0, p + 4, body - 4) != rd32(p))
            return CDP_STOP_CRC;
        for (uint64_t i = body; i < total; i++)
            if (p[i])
                return CDP_STOP_PAD;
    }
    *size = total;
    return CDP_STOP_END;
}

static int check_record(const uint8_t *p, uint64_t avail, uint64_t *size)
{
    return check_record_crc(p, avail, size, 1);
}

int cdp_fill_crcs(uint8_t *buf, uint64_t len, uint32_t *digest)
{
    uint32_t d = 0;
    uint64_t pos = 0;
    if (!digest)
        return CDP_EINVAL;
    while (pos < len) {
        uint64_t size;
        /* structure only: the checksums are what is being filled in */
        if (check_record_crc(buf + pos, len - pos, &size, 0) != CDP_STOP_END)
            return CDP_EINVAL;
        uint32_t crc = cdp_crc32c(0, buf + pos + 4, (uint64_t)CDP_REC_HDR_SIZE - 4 + rd32(buf + pos + 4));
        wr32(buf + pos, crc);
        d = cdp_crc32c(d, buf + pos, 4);
        pos += size;
    }
    *digest = d;
    return CDP_OK;
}

/* The sequence rule: each record's seq is expect (the previous + 1); in a
 * COMPACTED segment (seq_gaps) any larger seq is allowed too, since a prune
 * leaves gaps where folded records were. */
static inline int seq_ok(uint64_t got, uint64_t expect, int seq_gaps)
{
    return seq_gaps ? got >= expect : got == expect;
}

int cdp_scan(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t expect_seq,
             int64_t ts_base, uint64_t max_records,
             uint64_t idx_every_records, uint64_t idx_every_bytes,
             uint64_t *idx_seq, int64_t *idx_ts, uint64_t *idx_off, uint64_t idx_cap,
             struct cdp_scan_result *out, int seq_gaps)
{
    if (!out || start > len || (start & 7))
        return CDP_EINVAL;
    memset(out, 0, sizeof *out);
    uint64_t pos = start, seq = expect_seq, since_rec = 0, since_off = start;
    int64_t tsmax = ts_base, tsmin = INT64_MAX;
    int stop = CDP_STOP_END;
    while (pos < len) {
        if (max_records && out->count >= max_records) {
            stop = CDP_STOP_LIMIT;
            break;
        }
        uint64_t size;
        stop = check_record(buf + pos, len - pos, &size);
        if (stop != CDP_STOP_END)
            break;
        if (!seq_ok(rd64(buf + pos + 8), seq, seq_gaps)) {
            stop = CDP_STOP_SEQ;
            break;
        }
        seq = rd64(buf + pos + 8);
        int64_t ts = (int64_t)rd64(buf + pos + 16);
        if (ts > tsmax)
            tsmax = ts;
        if (ts < tsmin)
            tsmin = ts;
        uint64_t fid = rd64(buf + pos + 24);
        if (fid > out->file_id_max)
            out->file_id_max = fid;
        if (idx_cap && out->n_index < idx_cap &&
            (out->count == 0 || since_rec >= idx_every_records ||
             pos - since_off >= idx_every_bytes)) {
            idx_seq[out->n_index] = seq;
            idx_ts[out->n_index] = tsmax;
            idx_off[out->n_index] = pos;
            out->n_index++;
            since_rec = 0;
            since_off = pos;
        }
        since_rec++;
        out->count++;
        seq++;
        pos += size;
    }
    out->end = pos;
    out->last_seq = seq - 1;
    out->ts_min = out->count ? tsmin : 0;
    out->ts_max = tsmax;
    out->stop = stop;
    return CDP_OK;
}

int cdp_find_valid(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t after_seq,
                   uint64_t *found)
{
    if (!found)
        return CDP_EINVAL;
    *found = UINT64_MAX;
    for (uint64_t pos = (start + 7) & ~(uint64_t)7; pos + CDP_REC_HDR_SIZE <= len; pos += 8) {
        uint64_t size;
        if (rd16(buf + pos + 42) != CDP_REC_MARKER)
            continue;
        if (check_record(buf + pos, len - pos, &size) == CDP_STOP_END &&
            rd64(buf + pos + 8) > after_seq) {
            *found = pos;
            break;
        }
    }
    return CDP_OK;
}

int cdp_extract(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t expect_seq,
                uint64_t max_records, uint32_t skip_kinds, int check_crc,
                const uint64_t *key_of_fid, uint64_t n_fids, uint64_t file_no,
                uint64_t *key, uint64_t *row_start, uint64_t *row_end, uint64_t *file, uint64_t *src,
                uint64_t *seq, int64_t *ts, uint64_t cap, struct cdp_extract_result *res,
                int seq_gaps)
{
    if (!res || start > len || (start & 7))
        return CDP_EINVAL;
    memset(res, 0, sizeof *res);
    uint64_t pos = start, s = expect_seq, n = 0, count = 0;
    /* records with seq < expect_seq + max_records: with consecutive seqs,
     * exactly max_records of them; with gaps, the same seq range */
    uint64_t seq_end = max_records > UINT64_MAX - expect_seq ? UINT64_MAX : expect_seq + max_records;
    int stop = CDP_STOP_END;
    while (pos < len) {
        if (s >= seq_end) {
            stop = CDP_STOP_LIMIT;
            break;
        }
        uint64_t size;
        stop = check_record_crc(buf + pos, len - pos, &size, check_crc);
        if (stop != CDP_STOP_END)
            break;
        if (!seq_ok(rd64(buf + pos + 8), s, seq_gaps)) {
            stop = CDP_STOP_SEQ;
            break;
        }
        if (rd64(buf + pos + 8) >= seq_end) {
            /* past the range (a gap spans its end): every record of the
             * range is consumed, as last_seq = seq_end - 1 says */
            s = seq_end;
            stop = CDP_STOP_LIMIT;
            break;
        }
        s = rd64(buf + pos + 8);
        uint8_t kind = buf[pos + 40];
        if (n_fids && (kind == CDP_WRITE || kind == CDP_TRUNCATE)) {
            uint64_t fid = rd64(buf + pos + 24);
            uint64_t k = fid < n_fids ? key_of_fid[fid] : 0;
            if (k == 0) {
                stop = CDP_STOP_KIND;
                break;
            }
            if (n >= cap) {
                stop = CDP_STOP_LIMIT;
                break;
            }
            uint64_t off = rd64(buf + pos + 32);
            key[n] = k;
            row_start[n] = off;
            if (kind == CDP_WRITE) {
                row_end[n] = off + rd32(buf + pos + 4);
                file[n] = file_no;
                src[n] = pos + CDP_REC_HDR_SIZE;
            } else {
                row_end[n] = UINT64_MAX;
                file[n] = UINT64_MAX;
                src[n] = 0;
            }
            seq[n] = s;
            ts[n] = (int64_t)rd64(buf + pos + 16);
            n++;
        } else if (!(kind < 32 && (skip_kinds >> kind) & 1)) {
            stop = CDP_STOP_KIND;
            break;
        }
        res->last_ts = (int64_t)rd64(buf + pos + 16);
        count++;
        s++;
        pos += size;
    }
    res->end = pos;
    res->count = count;
    res->n_out = n;
    res->last_seq = s - 1;
    res->stop = stop;
    return CDP_OK;
}
