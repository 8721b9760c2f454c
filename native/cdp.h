/* cdp.h: the whole C interface of cdpcore's native layer.
 *
 * This header is read twice: by the C compiler, and (with every line that
 * starts with '#' removed) by cffi's cdef in native/build_cdp.py. Keep it plain
 * C declarations: enums, structs, prototypes. No macros with values.
 *
 * Every function returns a status (enum cdp_status); CDP_EIO means errno holds
 * the operating-system error. Policy lives in Python, not here.
 */
#ifndef CDP_H
#define CDP_H
#include <stddef.h>
#include <stdint.h>

enum cdp_status {
    CDP_OK = 0,
    CDP_EIO = -1,       /* a system call failed; errno says why */
    CDP_EINVAL = -2,    /* bad argument or malformed input buffer */
    CDP_ETOOBIG = -3,   /* payload larger than CDP_MAX_PAYLOAD */
    CDP_ESTALE = -4,    /* namespace generation changed (see cdp_append_encoded) */
    CDP_ECORRUPT = -5,  /* shared head state is damaged */
    CDP_ENOMEM = -6
};

/* Sizes of the on-disk structures (docs/journal-format.md). */
enum cdp_sizes {
    CDP_SEG_HDR_SIZE = 64,
    CDP_REC_HDR_SIZE = 48,
    CDP_HEAD_SIZE = 4096,
    CDP_REC_MARKER = 0x5243,          /* "CR" little-endian, bytes 42..43 */
    CDP_MAX_PAYLOAD = 16777216,       /* 16 MiB per record */
    CDP_MAX_KIND = 16
};

/* Record kinds (byte 40 of a record). */
enum cdp_kind {
    CDP_WRITE = 1, CDP_TRUNCATE = 2, CDP_FLUSH = 3, CDP_CREATE = 4,
    CDP_RENAME = 5, CDP_UNLINK = 6, CDP_MKDIR = 7, CDP_RMDIR = 8,
    CDP_SETATTR = 9, CDP_BOOKMARK = 10, CDP_FILEMAP = 11, CDP_BASE = 12,
    CDP_DIRTY = 13, CDP_SYMLINK = 14, CDP_LINK = 15, CDP_AUDIT = 16
};

/* Feature flag: 1 when CRC32C runs on the SSE4.2 instruction. */
int cdp_crc32c_hw(void);
uint32_t cdp_crc32c(uint32_t crc, const void *buf, size_t len);
/* Test hook: cap the CRC32C implementation at level (0 portable slicing-by-8,
 * 1 the SSE4.2 crc32 instruction, 2 also VPCLMULQDQ folding; each only where
 * the CPU has it) and return the level in force before; level < 0 only asks. */
int cdp_crc32c_level(int level);
const char *cdp_strerror(int status);

/* ---- scanning (verification, recovery, index building) ---------------- */

/* Why a scan stopped (cdp_scan_result.stop). */
enum cdp_stop {
    CDP_STOP_END = 0,       /* reached the end of the buffer exactly */
    CDP_STOP_SHORT = 1,     /* fewer bytes left than a header, or than the record claims */
    CDP_STOP_MARKER = 2,    /* marker, reserved field or kind invalid (zeroed space, garbage) */
    CDP_STOP_CRC = 3,       /* checksum mismatch */
    CDP_STOP_SEQ = 4,       /* sequence number not previous + 1 */
    CDP_STOP_PAD = 5,       /* padding bytes after the payload are not zero */
    CDP_STOP_LIMIT = 6      /* max_records reached */
};

struct cdp_scan_result {
    uint64_t end;           /* offset just past the last valid record */
    uint64_t count;         /* valid records */
    uint64_t last_seq;      /* seq of the last valid record (expect_seq - 1 if none) */
    int64_t ts_min;
    int64_t ts_max;         /* running max of timestamps over valid records */
    uint64_t n_index;       /* index entries written */
    uint64_t file_id_max;   /* largest file id seen (0 if none) */
    int stop;               /* enum cdp_stop */
};

/* Validate records in buf[start:len), the first expected to carry expect_seq
 * and each next one the previous + 1; with seq_gaps (a COMPACTED segment) a
 * record may carry any larger seq (count and last_seq then follow the
 * records, not the numbers). If idx_cap > 0, writes sparse index entries (seq, running ts max *before and
 * including* that record, offset) for the first record and then every
 * idx_every_records records or idx_every_bytes bytes. ts_base seeds the
 * running max. Never reads outside buf. */
int cdp_scan(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t expect_seq,
             int64_t ts_base, uint64_t max_records,
             uint64_t idx_every_records, uint64_t idx_every_bytes,
             uint64_t *idx_seq, int64_t *idx_ts, uint64_t *idx_off, uint64_t idx_cap,
             struct cdp_scan_result *out, int seq_gaps);

/* Compute and store the checksum of every record in buf[0:len), which must
 * hold whole records (structure checked as cdp_scan does, checksums not), and
 * set *digest to the CRC32C of those checksums as little-endian u32s in
 * order. A zstd-ref sender leaves record checksums out of a frame and sends
 * this digest instead (docs/protocol.md); CDP_EINVAL if a record is malformed
 * or runs past len. */
int cdp_fill_crcs(uint8_t *buf, uint64_t len, uint32_t *digest);

/* ---- a zstd-ref pack's literal column as planar columns (columns.c) ------ */

/* First byte of a column layout (docs/replication.md, "Compression"). */
enum cdp_columns_layout {
    CDP_COLUMNS_RAW = 0,            /* the literal column as it is (not records) */
    CDP_COLUMNS_PLANAR = 3,         /* u32 n, then the columns, CRCs included */
    CDP_COLUMNS_PLANAR_NO_CRC = 4   /* u32 n, u32 CRC32C of the CRCs, the columns without them */
};

/* Lay out lit[0:len) (record headers, each followed by its literal bytes)
 * as planar columns into out[0:cap), *out_len set to the size; a payload
 * shorter than literal_below is expected literal, others not (the bytes
 * decide). with_crcs = 0 leaves the records' CRCs out and writes the CRC32C
 * of them instead. CDP_EINVAL if lit does not parse as headers (send it
 * raw), CDP_ETOOBIG if cap is short (2 * len + 9 always suffices). */
int cdp_columns_encode(const uint8_t *lit, uint64_t len, uint64_t literal_below, int with_crcs,
                       uint8_t *out, uint64_t cap, uint64_t *out_len);

/* The inverse, over the start of buf: writes exactly lit_len bytes of
 * literal column (CRCs zero if they were left out; *digest their CRC32C,
 * 0 otherwise) and sets *used to the bytes of buf read. CDP_EINVAL if the
 * layout is not planar or anything does not fit. */
int cdp_columns_decode(const uint8_t *buf, uint64_t len, uint8_t *lit, uint64_t lit_len,
                       uint64_t *used, uint32_t *digest);

/* Search buf[start:len) at 8-byte steps for a record with a valid checksum and
 * seq > after_seq; returns its offset in *found or UINT64_MAX. */
int cdp_find_valid(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t after_seq,
                   uint64_t *found);

/* ---- planning a restore (plan.py) ----------------------------------------- */

/* One record to append; payload is not copied before the write(2). */
struct cdp_rec {
    uint8_t kind;
    uint8_t flags;
    uint64_t file_id;
    uint64_t offset;
    int64_t ts;             /* INT64_MIN: take CLOCK_REALTIME under the append lock */
    const void *payload;
    uint32_t len;
};


/* Where cdp_extract stopped, beyond the cdp_stop codes above. */
enum cdp_extract_stop {
    CDP_STOP_KIND = 7       /* a record Python must apply itself (res.end is its offset) */
};

struct cdp_extract_result {
    uint64_t end;           /* offset of the next record to read */
    uint64_t count;         /* records consumed (extracted or skipped) */
    uint64_t n_out;         /* rows written to the output columns */
    uint64_t last_seq;      /* seq of the last record consumed (expect_seq - 1 if none); after
                               a stop at the end of the seq range, expect_seq + max_records - 1 */
    int64_t last_ts;        /* its timestamp (0 if none) */
    int stop;               /* enum cdp_stop, or CDP_STOP_KIND */
};

/* Validate records in buf[start:len) as cdp_scan does (seq_gaps alike), those
 * with seq < expect_seq + max_records (max_records of them when seqs are
 * consecutive), and turn each WRITE and TRUNCATE into one row of the output columns:
 * key = key_of_fid[file id], start, end, file = file_no, src (the payload's
 * offset in buf) and seq, ts. A TRUNCATE to L is the row [L, UINT64_MAX) with
 * file = UINT64_MAX (a hole: what it cut reads as zeros) and src = 0. Records of the kinds in skip_kinds (bit k
 * for kind k) are consumed without a row. Stops, without consuming it, at any
 * other record and at a WRITE or TRUNCATE whose file id has no key (file id
 * >= n_fids or key 0): CDP_STOP_KIND, the caller applies that record. Stops
 * with CDP_STOP_LIMIT when cap rows are written. With n_fids = 0, WRITE and
 * TRUNCATE are treated like every other kind (skipped if in skip_kinds).
 * With check_crc = 0 only the structure is checked (marker, kind, length,
 * sequence), which keeps every read inside buf: for a caller that has the
 * checksums verified elsewhere (cdp_scan on another thread) before it trusts
 * the result. */
int cdp_extract(const uint8_t *buf, uint64_t len, uint64_t start, uint64_t expect_seq,
                uint64_t max_records, uint32_t skip_kinds, int check_crc,
                const uint64_t *key_of_fid, uint64_t n_fids, uint64_t file_no,
                uint64_t *key, uint64_t *row_start, uint64_t *row_end, uint64_t *file, uint64_t *src,
                uint64_t *seq, int64_t *ts, uint64_t cap, struct cdp_extract_result *res,
                int seq_gaps);

/* The visible extents of files built from rows in priority order (a later row
 * covers an earlier one where they overlap): rows are (key, start, end, file,
 * src, seq, ts) as cdp_extract writes them, with file naming the source file
 * (UINT64_MAX for a hole row: [start, end) reads as zeros, and a hole row with
 * end = UINT64_MAX sets the size to start). A row with start = end changes no
 * byte and no size (an empty write) but counts as a change for last_seq.
 * For every key k < n_keys: size[k] = the file's size after all its rows (0
 * without rows), last_seq[k], last_ts[k] = seq and ts of its last row (0 if
 * none). Pieces (p_key, p_start, p_len, p_file, p_src) are the data extents
 * below each size, sorted by key then start, neighbours from one contiguous
 * source merged; holes are not listed. p_rec[i] names the record a piece
 * comes from, for checking it: rec[row] for the rows below n_rec (rows
 * that stand for pieces of an earlier plan, a checkpoint), src[row] (the
 * payload's offset) for the others. cap must be at least 2 * n + 1.
 * Rows with key >= n_keys are CDP_EINVAL. */
int cdp_cover(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
              const uint64_t *file, const uint64_t *src, const uint64_t *seq, const int64_t *ts,
              uint64_t n_keys, uint64_t *size, uint64_t *last_seq, int64_t *last_ts,
              const uint64_t *rec, uint64_t n_rec,
              uint64_t *p_key, uint64_t *p_start, uint64_t *p_len, uint64_t *p_file,
              uint64_t *p_src, uint64_t *p_rec, uint64_t cap, uint64_t *n_pieces);

/* The first pass of cdp_cover alone: size, last_seq and last_ts of every
 * key after all the rows. */
int cdp_row_sizes(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
                  const uint64_t *file, const uint64_t *seq, const int64_t *ts, uint64_t n_keys,
                  uint64_t *size, uint64_t *last_seq, int64_t *last_ts);

/* Keep, in place and in order, only the rows a partial plan needs: rows of
 * keys with mode[key] = 1, and rows of keys with mode[key] = 2 that meet one
 * of the key's windows [w_start[i], w_end[i]) for i in [w_lo[key],
 * w_hi[key]) (sorted, disjoint); mode 0 keys lose all their rows. cols[0..2]
 * are key, start, end; every one of the n_cols columns is moved. *n_out is
 * the rows kept, *n_rec_out how many of them came from the first n_rec.
 * (Rollback: only the bytes that the records after the point changed are
 * read back.) */
int cdp_compact_rows(uint64_t n, uint64_t *const *cols, uint64_t n_cols, uint64_t n_rec,
                     const uint8_t *mode, uint64_t n_keys, const uint64_t *w_lo, const uint64_t *w_hi,
                     const uint64_t *w_start, const uint64_t *w_end, uint64_t *n_out, uint64_t *n_rec_out);

/* cdp_compact_rows for rows sorted by (key, start) and disjoint within a
 * key (a checkpoint's pieces), all of them counted as the first n_rec: the
 * same rows kept, found by a binary search per key and per window instead
 * of a pass over every row (a rollback's 2,662 windows in a checkpoint of
 * 262,144 pieces). Rows that break the order give a wrong answer, not an
 * error: the caller vouches for it (a checkpoint is checksummed). */
int cdp_compact_sorted(uint64_t n, uint64_t *const *cols, uint64_t n_cols, const uint8_t *mode,
                       uint64_t n_keys, const uint64_t *w_lo, const uint64_t *w_hi, const uint64_t *w_start,
                       const uint64_t *w_end, uint64_t *n_out);

/* Read the records that pieces come from into one buffer, with pread(2)
 * (a rollback's few thousand records lie scattered over every segment:
 * mapping the segments cost a page-table page and a fault per record, and
 * tearing the mappings down as much again). For each piece i whose source
 * has a descriptor (fds[file[i]] >= 0; -1 for base files, which are not
 * read), the record whose payload starts at rec[i] in that file, header and
 * padded payload, is read to the next 8-aligned offset of buf, and o_file[i]
 * = buf_file, o_src[i] and o_rec[i] say where the piece and its record's
 * payload lie in buf; a piece whose record is the previous piece's shares
 * it. Other pieces keep file, src and rec. The records are not checked
 * here (cdp_check_records, over buf, does that). *used receives the bytes
 * of buf used. CDP_ENOMEM when buf (cap bytes) is too small (the caller
 * retries with a larger one), CDP_EIO (errno) on a failed read, CDP_EINVAL
 * for a piece outside its record or a record that does not fit its file
 * (damage: *bad = that piece). */
int cdp_read_records(const int *fds, uint64_t n_fds, uint64_t n, const uint64_t *file, const uint64_t *src,
                     const uint64_t *len, const uint64_t *rec, uint8_t *buf, uint64_t cap, uint64_t buf_file,
                     uint64_t *o_file, uint64_t *o_src, uint64_t *o_rec, uint64_t *used, uint64_t *bad);

/* Check the WRITE record that piece i comes from, for every piece whose
 * source maps[file[i]] is not NULL (segments; NULL for base files): the
 * record's payload starts at payload[i] (a piece's p_rec). Marker, kind,
 * length, CRC and zero padding are checked as a scan would, without knowing
 * the sequence number. On damage, CDP_EINVAL with *bad = the first bad
 * piece. (A restore from a checkpoint reads only the records whose bytes it
 * copies, instead of every record before the checkpoint.) */
int cdp_check_records(const uint8_t *const *maps, const uint64_t *map_len, uint64_t n_maps,
                      const uint64_t *file, const uint64_t *payload, uint64_t n, uint64_t *bad);

/* Write pieces into fd: piece i is len[i] bytes from maps[file[i]] + src[i]
 * to offset dst[i], gathered with pwritev where destinations are contiguous.
 * A source outside its map (map_len) is CDP_EINVAL before anything is written
 * for that piece. *written receives the bytes written. */
int cdp_copy_out(int fd, uint64_t n, const uint64_t *dst, const uint64_t *len,
                 const uint64_t *file, const uint64_t *src, const uint8_t *const *maps,
                 const uint64_t *map_len, uint64_t n_maps, uint64_t *written);

/* The byte ranges that rows touched, per key (a rollback: only there can
 * the file differ from the point): every row's [start, end) (a truncate
 * row's end is UINT64_MAX: all past it may change; an empty write gives an
 * empty range, which still marks the key as touched), sorted by key then
 * start, overlapping and touching ranges of a key joined. Outputs hold up
 * to n ranges; *n_out receives their number. CDP_ENOMEM if the sort's
 * buffer cannot be had. */
int cdp_touched_ranges(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
                       uint64_t *o_key, uint64_t *o_start, uint64_t *o_end, uint64_t *n_out);

/* Fill in the page tables of the pages holding [p, p + len) of a file
 * mapping now (madvise MADV_POPULATE_READ, Linux 5.14), with the GIL
 * released (cffi): a restore's thread does this for 4 GB of segments while
 * the plan is laid out, and Python's mmap.madvise holds the GIL throughout.
 * p need not be page-aligned (the start is rounded down); len 0 is CDP_OK.
 * CDP_EIO with errno on failure: EINVAL where the kernel does not know the
 * advice, ENOMEM for a range that is not mapped, EFAULT for one that cannot
 * be read. */
int cdp_populate_read(const uint8_t *p, uint64_t len);

/* Put back a file's bytes where a rollback may have to (one call per file,
 * instead of a read, a compare and a write per range in Python). Ranges
 * [r_start[i], r_start[i] + r_len[i]) for i < n are sorted and disjoint;
 * pieces (p_start, p_len, p_file, p_src: the file's pieces of a plan, sorted
 * by start) say what the file holds at the point, zeros where none covers.
 * For each range fd's bytes are read into scratch (max r_len bytes) and
 * compared with the wanted bytes where they lie (in the mapped sources; no
 * copy of them is made); if they differ (a short read differs), the wanted
 * bytes are written, gathered from the sources (pwritev), and differs[i] =
 * 1, else 0. For each range written (every range, with all), the WRITE
 * records that say so are laid into recs (at most cap; CDP_ENOMEM past it):
 * one per fragment of the range (a piece's part, split at CDP_MAX_PAYLOAD;
 * a hole's, split at 64 KiB), whose payload points into the sources or into
 * a static block of zeros, adjoining fragments contiguous in their source
 * joined (an empty range has none); their file_id and ts are 0, for the
 * caller to set (cdp_recs_bind). The records stay valid while the mappings do. *n_recs
 * receives their number and *done the ranges finished, so that after
 * CDP_EIO (errno set) the caller knows which writes happened. A piece
 * outside its map is CDP_EINVAL, before that range is written. With kick >
 * 0, every time kick bytes have been written (and after the last range) the
 * file's writeback of them is started (sync_file_range WRITE, not waited
 * for; its errors are left to the caller's fsync), so that the disk works
 * while the rest is put back and the fsync after finds less to do. */
int cdp_put_back(int fd, uint64_t n, const uint64_t *r_start, const uint64_t *r_len,
                 uint64_t n_pieces, const uint64_t *p_start, const uint64_t *p_len,
                 const uint64_t *p_file, const uint64_t *p_src, const uint8_t *const *maps,
                 const uint64_t *map_len, uint64_t n_maps, uint8_t *scratch, int all,
                 uint8_t *differs, struct cdp_rec *recs, uint64_t cap, uint64_t *n_recs, uint64_t *done,
                 uint64_t kick);

/* ---- content-defined chunking (native/chunker.c) ------------------------ */

/* Cut buf[0:len) into chunks (FastCDC with normalized chunking, two bytes
 * per step): min_size >= 64, min_size < avg_size < max_size <= 1 GiB,
 * avg_size a power of two. Writes the end offset of each chunk to cuts (at
 * most cap) and their number to *n_cuts. A chunk ends at the first position
 * past min_size where the gear fingerprint meets the mask (harder before
 * avg_size, easier after), else at max_size. With last = 0 the bytes after
 * the last cut are left for the next call (more of the stream follows);
 * with last = 1 they are the final, possibly short, chunk. A cut depends
 * only on the bytes from the chunk's start to the cut. */
int cdp_chunk(const uint8_t *buf, uint64_t len, uint32_t min_size, uint32_t avg_size, uint32_t max_size,
              int last, uint64_t *cuts, uint64_t cap, uint64_t *n_cuts);

/* The mask with `bits` one-bits that cdp_chunk uses (tests pin them). */
uint64_t cdp_chunk_mask(int bits);

/* ---- writing ------------------------------------------------------------ */

/* (struct cdp_rec, one record to append, is declared with the planning
 * functions above: cdp_put_back fills them in.) */

struct cdp_append_result {
    uint64_t first_seq;
    uint64_t last_seq;
    uint64_t ns_gen;        /* namespace generation after the append */
};

/* Shared state of a journal, as read from its head file. */
struct cdp_state {
    uint64_t next_seq;
    uint64_t seg_no;
    uint64_t seg_off;
    uint64_t next_file_id;
    uint64_t ns_gen;
    uint64_t synced_seq;
    int64_t last_ts;
    uint64_t seg_size;
    uint8_t uuid[16];
    int pending;
};

typedef struct cdp_writer cdp_writer;

/* Open the writer of the journal in directory dir (journal.json, head and
 * segments/ already exist and the head is initialised). */
int cdp_writer_open(const char *dir, cdp_writer **out);
void cdp_writer_close(cdp_writer *w);

/* With bytes > 0, cdp_append starts the writeback of the records it has
 * written every `bytes` bytes (sync_file_range WRITE, not waited for), so
 * that the sync after a large append finds less to do: the disk works
 * while the rest is appended. 0 (the default) turns it off: a capture's
 * small appends must not wait for a disk queue. Only the appending thread
 * may change it. */
void cdp_writer_set_writeback(cdp_writer *w, uint64_t bytes);

/* Initialise the head from a recovery scan (caller holds the lock). */
int cdp_writer_set_state(cdp_writer *w, const struct cdp_state *st);
int cdp_writer_get_state(cdp_writer *w, struct cdp_state *st);
/* The append lock (process mutex + flock on head). Reentrant for the thread
 * that holds it: every function below may be called with it held. */
int cdp_writer_lock(cdp_writer *w);
int cdp_writer_unlock(cdp_writer *w);

/* Append n records atomically with consecutive sequence numbers. If
 * expect_ns_gen != UINT64_MAX and the namespace generation differs, nothing is
 * written and CDP_ESTALE is returned. */
int cdp_append(cdp_writer *w, const struct cdp_rec *recs, size_t n,
               uint64_t expect_ns_gen, struct cdp_append_result *res);

/* Set file_id and ts of n records (a rollback's WRITE records, made by
 * cdp_put_back before the journal binds the file's id: a Python loop over
 * thousands of cffi structs cost more than the append). */
void cdp_recs_bind(struct cdp_rec *recs, uint64_t n, uint64_t file_id, int64_t ts);

/* Append a buffer of records already laid out as on disk (headers with len,
 * ts, file_id, offset, kind, flags, marker; payloads; zero padding). Fills in
 * seq, ts (where INT64_MIN) and crc in place, then writes. */
int cdp_append_encoded(cdp_writer *w, uint8_t *buf, size_t len,
                       uint64_t expect_ns_gen, struct cdp_append_result *res);

/* Number of BASE records appended since the head was last rebuilt (read it
 * with the lock held): a BASE unbinds every file id, so a writer that caches
 * ids re-binds them when this changes. */
uint64_t cdp_writer_base_gen(cdp_writer *w);

/* Reserve n file ids; *first receives the first. */
int cdp_alloc_file_ids(cdp_writer *w, uint64_t n, uint64_t *first);

/* Group commit: returns once every record appended before the call is on
 * stable storage. *synced receives the durable sequence number. */
int cdp_sync(cdp_writer *w, uint64_t *synced);

/* Riding a barrier on the program's own flush (capture.md, "Durability").
 * cdp_sync_ride drains and, when every record not yet durable lies in the
 * active segment's durable preallocated tail and that segment is on ext4 on
 * device dev, writes those records to the device (sync_file_range, no
 * flush) and sets *cover to the last of them (0: nothing to do). The caller
 * then runs the program's fsync/fdatasync of a file on dev, whose device
 * flush makes them durable, and on success reports it with cdp_sync_rode.
 * CDP_ESTALE: cannot ride; use cdp_sync. CDP_EIO: writing them failed (the
 * error is consumed: do not retry with cdp_sync, report it). */
int cdp_sync_ride(cdp_writer *w, uint64_t dev, uint64_t *cover);
int cdp_sync_rode(cdp_writer *w, uint64_t cover);
/* Keep a durable preallocated tail in the active segment (the background
 * thread of `cdpctl protect`): when less than `low` bytes of it lie past the
 * committed end, write zeros up to `ahead` bytes past it (at most 1 MiB per
 * call, under the append lock but not the stage mutex) and fdatasync them
 * (out of the lock). */
int cdp_prealloc(cdp_writer *w, uint64_t low, uint64_t ahead);

/* ---- staging (the capture library's fast path; writer.c explains) ------- */

/* Create the journal's stage (cap bytes of records, in $CDPCORE_STAGE_DIR or
 * /dev/shm) and name it in the head; every writer drains it when it locks. */
int cdp_stage_create(cdp_writer *w, uint64_t cap);
/* Move staged records into the journal while programs keep staging (the
 * background drain of `cdpctl protect`). */
int cdp_stage_drain(cdp_writer *w);
/* Drain and remove the stage; writers that still stage go direct. */
int cdp_stage_remove(cdp_writer *w);
/* Reserve room for a record of at most maxlen payload bytes and take the
 * stage mutex; *payload is where the payload goes. CDP_ESTALE: no stage
 * (append directly instead); CDP_ETOOBIG: too large to stage. */
int cdp_stage_begin(cdp_writer *w, uint32_t maxlen, uint8_t **payload);
/* Publish the reserved record with len <= maxlen payload bytes, release. */
void cdp_stage_commit(cdp_writer *w, uint8_t kind, uint64_t file_id, uint64_t offset, uint32_t len);
/* Release without publishing. */
void cdp_stage_abort(cdp_writer *w);

/* Write a segment header into buf (CDP_SEG_HDR_SIZE bytes). */
void cdp_segment_header(uint8_t *buf, const uint8_t *uuid, uint64_t seg_no,
                        uint64_t first_seq, int64_t created_us);

int64_t cdp_now_us(void);

/* A 64-bit digest of /proc/sys/kernel/random/boot_id (0 if unreadable). The
 * head stores the boot it was written in: a head from an earlier boot is not
 * trusted (cdp_sync does not msync it). */
uint64_t cdp_boot_id(void);

#endif
