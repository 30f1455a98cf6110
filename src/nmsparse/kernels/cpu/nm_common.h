// Shared by every CPU kernel source in this folder (each built into its own library by
// _build.py, which hashes this header into every library's name): scalar helpers that use
// no vector instruction, so any instruction set's build can include them.
#pragma once

#include <stdint.h>
#include <string.h>

// Bumped when a signature changes; _build.py checks every library's nmsparse_cpu_abi().
#define NMSPARSE_CPU_ABI 5

// The options bit of nmsparse_nm_linear / nmsparse_unpack: the CPU has AVX512_BF16 and VBMI.
#define OPTION_BF16 8

typedef uint16_t bf16_t;

// bf16 is the top half of an fp32: widening is exact.
inline float scalar_f32(float v) { return v; }
inline float scalar_f32(bf16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
