// softmax.cu compiled for the CPU emulator (see emu.h).
#include "emu.h"

#include "../../softmax.cu"
