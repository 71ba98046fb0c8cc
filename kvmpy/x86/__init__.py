"""x86-64 architecture helpers: page tables, descriptor tables, CPUID, long-mode vCPU setup.

The page sizes themselves (PAGE_4K, PAGE_2M, PAGE_1G) are defined once, in :mod:`kvmpy.memory`.
"""
