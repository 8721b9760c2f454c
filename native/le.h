/* le.h: little-endian loads and stores at unaligned addresses, shared by
 * the C sources (journal formats are little-endian; memcpy lets the
 * compiler emit one move). Not part of the cffi interface (cdp.h). */
#ifndef CDP_LE_H
#define CDP_LE_H
#include <stdint.h>
#include <string.h>

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

#endif
