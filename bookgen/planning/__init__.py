"""Will an experiment fit its GPUs, and how long will it take: the memory and time plan."""
