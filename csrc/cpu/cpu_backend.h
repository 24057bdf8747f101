// The CPU backend (csrc/cpu/consensus_cpu.cpp), visible to the native tests, which swap one of its routines.
#pragma once

#include "../consensus.h"

namespace decaf {

extern const Backend kCpuBackend;

}  // namespace decaf
