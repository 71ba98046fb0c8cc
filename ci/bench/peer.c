// SPDX-License-Identifier: GPL-2.0-only
/*
 * The C side of the side-by-side benchmark (ci/bench/side_by_side.py): each row
 * of the table done the way a kernel KVM selftest does it, with the selftests'
 * kvm_util library (built by ci/bench/ksrc.py with the selftests' own flags).
 * ci/bench/micro.py does the same work with kvmpy.
 *
 * usage: kvmpy_peer ROW SAMPLES|serve BATCH
 * Prints one line per sample: nanoseconds per operation (the mean of BATCH
 * operations, or one operation when a row times a single one).  With "serve"
 * it sets the row up, then takes one sample per line read from stdin, until
 * EOF: side_by_side.py alternates these with micro.py's, sample by sample.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <asm/barrier.h>
#include <linux/bitmap.h>

#include "kvm_util.h"
#include "processor.h"

#define EXIT_LOOP_PORT 0xe0		/* as guests/lib/stages.h */
#define TEST_GPA (4ull << 30)
#define SLOT_PAGES_1G 262144ull
#define BITMAP_SET 26000
#define RING_ENTRIES 65536
#define PT_PAGES 70000
#define SLOT_64M_PAGES 16384

static int serve, remaining;

/* Whether to take another sample: a line on stdin (serve), or the count. */
static bool next_sample(void)
{
	char line[16];

	if (serve)
		return fgets(line, sizeof(line), stdin) != NULL;
	return remaining-- > 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void report(uint64_t t0, int batch)
{
	printf("%.1f\n", (double)(now_ns() - t0) / batch);
	fflush(stdout);
}

/* KVM_RUN exit round trip: a guest that does nothing but OUT. */
static void exit_loop_guest(void)
{
	for (;;)
		asm volatile("outb %b0, %w1" :: "a"(0), "Nd"(EXIT_LOOP_PORT));
}

static void row_exit(int batch)
{
	struct kvm_vcpu *vcpu;
	struct kvm_vm *vm = vm_create_with_one_vcpu(&vcpu, exit_loop_guest);

	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++) {
			vcpu_run(vcpu);
			TEST_ASSERT(vcpu->run->exit_reason == KVM_EXIT_IO, "exit %u", vcpu->run->exit_reason);
		}
		report(t0, batch);
	}
	kvm_vm_free(vm);
}

/* VM + vCPU + 64 MiB slot + destroy. */
static void row_vm_cycle(int batch)
{
	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++) {
			struct kvm_vm *vm = vm_create_barebones();

			vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, TEST_GPA, 1, SLOT_64M_PAGES, 0);
			__vm_vcpu_add(vm, 0);
			kvm_vm_free(vm);
		}
		report(t0, batch);
	}
}

/* KVM_GET_DIRTY_LOG of a 1 GiB logged slot. */
static void row_get_dirty_log(int batch)
{
	struct kvm_vm *vm = vm_create_barebones();
	unsigned long *bmap = bitmap_zalloc(SLOT_PAGES_1G);

	vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, TEST_GPA, 1, SLOT_PAGES_1G, KVM_MEM_LOG_DIRTY_PAGES);
	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++)
			kvm_vm_get_dirty_log(vm, 1, bmap);
		report(t0, batch);
	}
	free(bmap);
	kvm_vm_free(vm);
}

/* The bitmap both sides scan: BITMAP_SET bits of SLOT_PAGES_1G, from xorshift64 with seed 1. */
static void fill_bitmap(uint64_t *words)
{
	uint64_t x = 1;
	int set = 0;

	while (set < BITMAP_SET) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		uint64_t bit = x % SLOT_PAGES_1G;

		if (!(words[bit / 64] >> (bit % 64) & 1)) {
			words[bit / 64] |= 1ull << (bit % 64);
			set++;
		}
	}
}

/* Dirty bitmap -> list of page indices. */
static void row_bitmap_pages(int batch)
{
	uint64_t *words = calloc(SLOT_PAGES_1G / 64, 8);
	uint64_t *pages = malloc(SLOT_PAGES_1G * 8);
	size_t k = 0;

	fill_bitmap(words);
	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++) {
			k = 0;
			for (size_t w = 0; w < SLOT_PAGES_1G / 64; w++)
				for (uint64_t x = words[w]; x; x &= x - 1)
					pages[k++] = w * 64 + __builtin_ctzll(x);
			asm volatile("" :: "r"(pages) : "memory");
		}
		report(t0, batch);
	}
	TEST_ASSERT(k == BITMAP_SET, "%zu pages", k);
	free(words);
	free(pages);
}

/*
 * Harvest a full dirty ring and KVM_RESET_DIRTY_RINGS, as dirty_log_test.c
 * collects one: acquire-load the flags, take slot and offset, release-store
 * RESET.  The host fills the ring (KVM only reads its own indices at reset).
 */
static void row_ring_harvest(int batch)
{
	struct kvm_vm *vm = vm_create_barebones();
	struct kvm_vcpu *vcpu;
	struct kvm_dirty_gfn *ring;
	uint32_t *slots = malloc(RING_ENTRIES * 4), fetch = 0;
	uint64_t *offsets = malloc(RING_ENTRIES * 8);

	vm_enable_dirty_ring(vm, RING_ENTRIES * sizeof(struct kvm_dirty_gfn));
	vcpu = __vm_vcpu_add(vm, 0);
	ring = vcpu_map_dirty_ring(vcpu);
	while (next_sample()) {
		uint64_t t0 = 0;

		for (int b = 0; b < batch; b++) {
			uint32_t n = 0;

			for (uint32_t i = 0; i < RING_ENTRIES; i++) {
				ring[i].slot = 1;
				ring[i].offset = i;
				smp_store_release(&ring[i].flags, KVM_DIRTY_GFN_F_DIRTY);
			}
			uint64_t start = now_ns();

			for (;;) {
				struct kvm_dirty_gfn *e = &ring[fetch & (RING_ENTRIES - 1)];

				if (!(smp_load_acquire(&e->flags) & KVM_DIRTY_GFN_F_DIRTY))
					break;
				slots[n] = e->slot;
				offsets[n] = e->offset;
				smp_store_release(&e->flags, KVM_DIRTY_GFN_F_RESET);
				fetch++;
				n++;
			}
			kvm_vm_reset_dirty_ring(vm);
			t0 += now_ns() - start;
			TEST_ASSERT(n == RING_ENTRIES, "harvested %u", n);
		}
		printf("%.1f\n", (double)t0 / batch);
		fflush(stdout);
	}
	kvm_vm_free(vm);
}

/* Open a stats fd, read its header and descriptors, read the named stat, close: kvm_util's
   __vm_get_stat on a fresh fd. */
static uint64_t stat_once(int fd, const char *name)
{
	struct kvm_stats_header header;
	struct kvm_stats_desc *descs;
	uint64_t value = 0;

	read_stats_header(fd, &header);
	descs = read_stats_descriptors(fd, &header);
	for (uint32_t i = 0; i < header.num_desc; i++) {
		struct kvm_stats_desc *d = get_stats_descriptor(descs, i, &header);

		if (!strcmp(d->name, name)) {
			read_stat_data(fd, &header, d, &value, 1);
			break;
		}
	}
	free(descs);
	close(fd);
	return value;
}

static void row_stats_open(int batch)
{
	struct kvm_vm *vm = vm_create_barebones();
	struct kvm_vcpu *vcpu = __vm_vcpu_add(vm, 0);

	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++) {
			stat_once(vm_get_stats_fd(vm), "remote_tlb_flush");
			stat_once(vcpu_get_stats_fd(vcpu), "exits");
		}
		report(t0, batch);
	}
	kvm_vm_free(vm);
}

/* Re-read one VM stat by name: kvm_util's vm_get_stat (fd and descriptors read on first use). */
static void row_stats_read(int batch)
{
	struct kvm_vm *vm = vm_create_barebones();

	vm_get_stat(vm, "pages_4k");
	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++)
			vm_get_stat(vm, "pages_4k");
		report(t0, batch);
	}
	kvm_vm_free(vm);
}

/* Re-read every value of an open vCPU stats fd (one pread of the data block). */
static void row_stats_reread(int batch)
{
	struct kvm_vm *vm = vm_create_barebones();
	struct kvm_vcpu *vcpu = __vm_vcpu_add(vm, 0);
	int fd = vcpu_get_stats_fd(vcpu);
	struct kvm_stats_header header;
	struct kvm_stats_desc *descs;
	size_t size = 0;
	void *data;

	read_stats_header(fd, &header);
	descs = read_stats_descriptors(fd, &header);
	for (uint32_t i = 0; i < header.num_desc; i++) {
		struct kvm_stats_desc *d = get_stats_descriptor(descs, i, &header);

		if (d->offset + 8ul * d->size > size)
			size = d->offset + 8ul * d->size;
	}
	data = malloc(size);
	while (next_sample()) {
		uint64_t t0 = now_ns();

		for (int i = 0; i < batch; i++)
			TEST_ASSERT(pread(fd, data, size, header.data_offset) == (ssize_t)size, "pread");
		report(t0, batch);
	}
	free(data);
	free(descs);
	close(fd);
	kvm_vm_free(vm);
}

/* Page tables mapping a PT_PAGES-page slot with 4K pages (virt_map), in a fresh VM each time. */
static void row_page_tables(int batch)
{
	while (next_sample()) {
		uint64_t t = 0;

		for (int b = 0; b < batch; b++) {
			struct kvm_vm *vm = __vm_create(VM_SHAPE_DEFAULT, 1, 1024);
			uint64_t start;

			vm_userspace_mem_region_add(vm, VM_MEM_SRC_ANONYMOUS, TEST_GPA, 1, PT_PAGES, 0);
			start = now_ns();
			virt_map(vm, TEST_GPA, TEST_GPA, PT_PAGES);
			t += now_ns() - start;
			kvm_vm_free(vm);
		}
		printf("%.1f\n", (double)t / batch);
		fflush(stdout);
	}
}

static const struct {
	const char *name;
	void (*fn)(int batch);
} rows[] = {
	{ "exit", row_exit },
	{ "exit_bare", row_exit },	/* kvmpy's floor: its bare KVM_RUN call against the same C */
	{ "vm_cycle", row_vm_cycle },
	{ "get_dirty_log", row_get_dirty_log },
	{ "bitmap_pages", row_bitmap_pages },
	{ "ring_harvest", row_ring_harvest },
	{ "stats_open", row_stats_open },
	{ "stats_read", row_stats_read },
	{ "stats_reread", row_stats_reread },
	{ "page_tables", row_page_tables },
};

int main(int argc, char *argv[])
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s ROW SAMPLES|serve BATCH\n", argv[0]);
		return 2;
	}
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		if (!strcmp(rows[i].name, argv[1])) {
			serve = !strcmp(argv[2], "serve");
			remaining = serve ? 0 : atoi(argv[2]);
			rows[i].fn(atoi(argv[3]));
			return 0;
		}
	}
	fprintf(stderr, "%s: unknown row %s\n", argv[0], argv[1]);
	return 2;
}
