// The small problems of the exact Gram path on the CPU (csrc/cpu/gram_svd_cpu.cpp).
#pragma once

#include "../consensus.h"

namespace decaf {

std::optional<GramSvd> gram_svd_cpu(const Backend& backend, const GramProblems& problems);

}  // namespace decaf
