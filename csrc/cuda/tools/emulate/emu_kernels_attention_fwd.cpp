// attention_fwd.cu compiled for the CPU emulator (see emu.h).
#include "emu.h"

#include "../../attention_fwd.cu"
