"""Performance tools: `kvmpy perf dirty-log` (the kernel's dirty_log_perf_test phases) and its guest's VM."""
