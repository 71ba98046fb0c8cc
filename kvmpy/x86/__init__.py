"""x86-64 architecture helpers: page tables, descriptor tables, long-mode vCPU setup."""
