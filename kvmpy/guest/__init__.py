"""Guest programs: find/build them, load their ELF, decode ucalls, run them."""
