//! Quiescing: freeze/thaw hooks, FIFREEZE/FITHAW and the qemu-guest-agent, with hard time limits.
