/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The bulk work of kvmpy in C, compiled into the cffi extension (kvmpy._kvm_abi)
 * after <linux/kvm.h>: what Python would do entry by entry (dirty-ring harvest,
 * bitmap scans, stats descriptor lookup, page-table construction) or where a
 * per-exit/per-ioctl call must cost no more than the C selftests' (KVM_RUN and
 * KVM_GET_DIRTY_LOG with the argument struct on the C stack).
 *
 * Every pointer comes from a cffi buffer the caller holds for the duration of
 * the call; nothing here keeps a pointer past its return.
 */

/* ---- ioctls on the hot paths ------------------------------------------------ */

/* KVM_RUN (the GIL is released for the whole guest run); the exit reason, or -errno. */
int kvmpy_vcpu_run_reason(int fd, const struct kvm_run *run)
{
	if (ioctl(fd, KVM_RUN, 0) < 0)
		return -errno;
	return (int)run->exit_reason;
}

/*
 * A vCPU's run state, shared by the thread that runs it and those that kick or
 * close it.  The runner sets running, then tid, then reads closing; close()
 * sets closing, then reads running: with sequentially consistent atomics one
 * of them sees the other, so a run never starts on a vCPU being closed, and
 * close() never frees the run page under a run (it waits until running is 0).
 * A kick stores immediate_exit, then reads tid, against the runner's store of
 * tid before KVM_RUN reads immediate_exit: a run either sees the kick or is
 * signalled.
 */
struct kvmpy_vcpu_state {
	int fd;
	int running;
	int closing;
	unsigned long tid;	/* pthread_self() of the running thread; 0 when none */
	struct kvm_run *run;
};

enum {
	KVMPY_RUN_BUSY = -100000,	/* another thread is running the vCPU */
	KVMPY_RUN_CLOSED = -100001,	/* close() has begun */
};

/* KVM_RUN under the run state: the exit reason, -errno, or KVMPY_RUN_BUSY/CLOSED. */
int kvmpy_vcpu_run_state(struct kvmpy_vcpu_state *s)
{
	int r;

	if (__atomic_exchange_n(&s->running, 1, __ATOMIC_SEQ_CST))
		return KVMPY_RUN_BUSY;
	__atomic_store_n(&s->tid, (unsigned long)pthread_self(), __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&s->closing, __ATOMIC_SEQ_CST))
		r = KVMPY_RUN_CLOSED;
	else if (ioctl(s->fd, KVM_RUN, 0) < 0)
		r = -errno;
	else
		r = (int)s->run->exit_reason;
	__atomic_store_n(&s->tid, 0, __ATOMIC_SEQ_CST);
	__atomic_store_n(&s->running, 0, __ATOMIC_SEQ_CST);
	return r;
}

/* The thread running the vCPU (1 while it has not said which yet), or 0. */
unsigned long kvmpy_vcpu_runner(struct kvmpy_vcpu_state *s)
{
	unsigned long tid = __atomic_load_n(&s->tid, __ATOMIC_SEQ_CST);

	return tid ? tid : (unsigned long)__atomic_load_n(&s->running, __ATOMIC_SEQ_CST);
}

/* close(): refuse new runs from now on; returns kvmpy_vcpu_runner(). */
unsigned long kvmpy_vcpu_stop_runs(struct kvmpy_vcpu_state *s)
{
	__atomic_store_n(&s->closing, 1, __ATOMIC_SEQ_CST);
	return kvmpy_vcpu_runner(s);
}

/* A kick: immediate_exit = 1, then the thread to signal (0: none in KVM_RUN yet). */
unsigned long kvmpy_vcpu_kick(struct kvmpy_vcpu_state *s)
{
	__atomic_store_n(&s->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	return __atomic_load_n(&s->tid, __ATOMIC_SEQ_CST);
}

/* KVM_GET_DIRTY_LOG of slot into bitmap; 0 or -errno. */
int kvmpy_get_dirty_log(int fd, uint32_t slot, void *bitmap)
{
	struct kvm_dirty_log log;

	memset(&log, 0, sizeof(log));
	log.slot = slot;
	log.dirty_bitmap = bitmap;
	return kvmpy_ioctl(fd, KVM_GET_DIRTY_LOG, (unsigned long)&log) < 0 ? -errno : 0;
}

/* ---- dirty bitmaps ------------------------------------------------------------ */

/*
 * POPCNT where the CPU has it (chosen once, at load, by an ifunc): without it
 * gcc counts bits in software, which made a 1 GiB slot's popcount cost a third
 * of a bitmap -> pages scan.
 */
#define KVMPY_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))

KVMPY_POPCNT_CLONES
unsigned long kvmpy_popcount(const uint64_t *words, size_t n)
{
	unsigned long c = 0;

	for (size_t i = 0; i < n; i++)
		c += (unsigned long)__builtin_popcountll(words[i]);
	return c;
}

/*
 * Writes the indices of set bits into out (at most out_len); returns the total
 * count.  The bound is checked once a word: the words may change under us (the
 * GIL is released), so the count taken before is only a hint.
 */
KVMPY_POPCNT_CLONES
size_t kvmpy_set_bits(const uint64_t *words, size_t n, uint64_t *out, size_t out_len)
{
	size_t k = 0;

	for (size_t i = 0; i < n; i++) {
		uint64_t w = words[i];

		if (!w)
			continue;
		if (k + (size_t)__builtin_popcountll(w) > out_len) {
			for (; w && k < out_len; w &= w - 1)
				out[k++] = i * 64 + (uint64_t)__builtin_ctzll(w);
			return k + (size_t)__builtin_popcountll(w) + kvmpy_popcount(words + i + 1, n - i - 1);
		}
		for (; w; w &= w - 1)
			out[k++] = i * 64 + (uint64_t)__builtin_ctzll(w);
	}
	return k;
}

/* ---- dirty ring --------------------------------------------------------------- */

/*
 * Collect up to limit entries KVM published (flag DIRTY) from index fetch on,
 * in order, into slots/offsets, and mark each RESET.  The flags load is an
 * acquire, so slot and offset are read after it; the RESET store is a release,
 * so KVM sees it only after they were read.  Returns how many were collected.
 */
uint32_t kvmpy_ring_harvest(struct kvm_dirty_gfn *gfns, uint32_t mask, uint32_t fetch, uint32_t limit,
			    uint32_t *slots, uint64_t *offsets)
{
	uint32_t n;

	for (n = 0; n < limit; n++) {
		struct kvm_dirty_gfn *e = &gfns[(fetch + n) & mask];

		if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
			break;
		slots[n] = e->slot;
		offsets[n] = e->offset;
		__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
	}
	return n;
}

/* ---- binary stats ------------------------------------------------------------- */

/*
 * The fast checks of a stats fd image (header, id, descriptors: its first len
 * bytes).  kvmpy.stats explains a failure with its own check, which names the
 * values involved.
 */
enum {
	KVMPY_STATS_NOT_FOUND = -1,
	KVMPY_STATS_BAD_HEADER = -2,
	KVMPY_STATS_BAD_DESC = -3,
};

/* 0 if the header's offsets and sizes are consistent with len bytes, else KVMPY_STATS_BAD_HEADER. */
int kvmpy_stats_check_header(const char *buf, size_t len)
{
	struct kvm_stats_header h;
	uint64_t stride, desc_end;

	if (len < sizeof(h))
		return KVMPY_STATS_BAD_HEADER;
	memcpy(&h, buf, sizeof(h));
	stride = sizeof(struct kvm_stats_desc) + (uint64_t)h.name_size;
	/* Divide rather than multiply: num_desc * stride can wrap around 2^64. */
	if (h.desc_offset > len || h.num_desc > (len - h.desc_offset) / stride)
		return KVMPY_STATS_BAD_HEADER;
	desc_end = h.desc_offset + h.num_desc * stride;
	if (h.name_size == 0 || h.id_offset < sizeof(h) || (uint64_t)h.id_offset + h.name_size > len ||
	    h.desc_offset < sizeof(h) || desc_end > len || (h.num_desc && h.data_offset < desc_end) ||
	    (h.id_offset < h.desc_offset && h.desc_offset < (uint64_t)h.id_offset + h.name_size))
		return KVMPY_STATS_BAD_HEADER;
	return 0;
}

/*
 * The descriptor named name in a stats image whose header passed the check:
 * offset | size << 32 | (more than one value) << 48, or KVMPY_STATS_NOT_FOUND,
 * or KVMPY_STATS_BAD_DESC when its type, unit, base, size or bucket size is not
 * one the ABI defines.  A name not NUL-terminated within name_size never matches.
 */
int64_t kvmpy_stats_locate(const char *buf, size_t len, const char *name)
{
	struct kvm_stats_header h;
	size_t nlen = strlen(name), stride;

	if (kvmpy_stats_check_header(buf, len))
		return KVMPY_STATS_BAD_HEADER;
	memcpy(&h, buf, sizeof(h));
	stride = sizeof(struct kvm_stats_desc) + h.name_size;
	if (nlen == 0 || nlen >= h.name_size)
		return KVMPY_STATS_NOT_FOUND;
	for (uint32_t i = 0; i < h.num_desc; i++) {
		const char *d = buf + h.desc_offset + (size_t)i * stride;
		const char *n = d + sizeof(struct kvm_stats_desc);
		struct kvm_stats_desc desc;
		uint32_t type, unit, base;

		if (n[0] != name[0] || memcmp(n, name, nlen + 1))
			continue;
		memcpy(&desc, d, sizeof(desc));
		type = desc.flags & KVM_STATS_TYPE_MASK;
		unit = desc.flags & KVM_STATS_UNIT_MASK;
		base = desc.flags & KVM_STATS_BASE_MASK;
		if (type > KVM_STATS_TYPE_MAX || unit > KVM_STATS_UNIT_MAX || base > KVM_STATS_BASE_MAX ||
		    desc.size == 0 || (type == KVM_STATS_TYPE_LINEAR_HIST && desc.bucket_size == 0))
			return KVMPY_STATS_BAD_DESC;
		return (int64_t)desc.offset | (int64_t)desc.size << 32 |
		       (int64_t)(desc.size > 1 || type == KVM_STATS_TYPE_LINEAR_HIST ||
				 type == KVM_STATS_TYPE_LOG_HIST) << 48;
	}
	return KVMPY_STATS_NOT_FOUND;
}

/*
 * One u64 stat value at file offset pos of a stats fd: the value, or UINT64_MAX with
 * errno set (0 when the value really is UINT64_MAX; EIO for a short read).
 */
uint64_t kvmpy_stats_read_u64(int fd, int64_t pos)
{
	uint64_t v;
	ssize_t r;

	errno = 0;
	r = pread(fd, &v, sizeof(v), pos);
	if (r == (ssize_t)sizeof(v))
		return v;
	if (r >= 0)
		errno = EIO;
	return UINT64_MAX;
}

/* ---- page tables -------------------------------------------------------------- */

#define KVMPY_PTE_P  (1ull << 0)
#define KVMPY_PTE_PS (1ull << 7)
#define KVMPY_PTE_ADDR 0x000ffffffffff000ull

/* Where table pages come from: pools[i] is guest memory [gpa, gpa+size) at host address hva. */
struct kvmpy_pt_pool {
	uint64_t gpa, size, hva;
};

/*
 * One mapping request and the allocator state, updated in place: map npages
 * pages of page_size from gva/gpa on with leaf entries gpa | leaf_bits (the
 * caller includes PS for 2M/1G), new tables linked with table_bits.  Table
 * pages come from pools[pool] at next, then from the following pools.
 */
struct kvmpy_pt_req {
	uint64_t cr3, gva, gpa, npages, page_size, leaf_bits, table_bits;
	uint32_t npools, pool;
	uint64_t next;
	uint64_t allocated;	/* out: table pages taken from the pools */
	uint64_t done;		/* out: pages mapped */
	uint64_t fail_gva;	/* out: where an error happened */
};

enum {
	KVMPY_PT_OK = 0,
	KVMPY_PT_EXHAUSTED = 1,	/* every pool is full */
	KVMPY_PT_IN_HUGE = 2,	/* fail_gva lies inside a bigger page */
	KVMPY_PT_OVER_TABLE = 3,	/* a huge leaf would replace a table of smaller mappings */
	KVMPY_PT_FOREIGN = 4,	/* an existing table lies outside every pool */
};

static uint64_t *pt_table(const struct kvmpy_pt_req *req, const struct kvmpy_pt_pool *pools, uint64_t gpa)
{
	for (uint32_t i = 0; i < req->npools; i++)
		if (gpa >= pools[i].gpa && gpa + 4096 <= pools[i].gpa + pools[i].size)
			return (uint64_t *)(uintptr_t)(pools[i].hva + (gpa - pools[i].gpa));
	return NULL;
}

/*
 * The next table page: from pools[pool] at next, moving on to the start of the
 * following pool (which may lie below) when it is full.  When all are full: 0,
 * with pool and next left at the end of the last one, so the caller's state
 * stays a valid position.
 */
static uint64_t pt_alloc(struct kvmpy_pt_req *req, const struct kvmpy_pt_pool *pools)
{
	while (req->pool < req->npools) {
		const struct kvmpy_pt_pool *p = &pools[req->pool];

		if (req->next >= p->gpa && req->next + 4096 <= p->gpa + p->size) {
			uint64_t gpa = req->next;

			req->next += 4096;
			req->allocated++;
			memset((void *)(uintptr_t)(p->hva + (gpa - p->gpa)), 0, 4096);
			return gpa;
		}
		if (req->pool + 1 == req->npools) {
			req->next = p->gpa + p->size;
			return 0;
		}
		req->pool++;
		req->next = pools[req->pool].gpa;
	}
	return 0;
}

int kvmpy_pt_map(struct kvmpy_pt_req *req, const struct kvmpy_pt_pool *pools)
{
	int leaf_level = req->page_size == (1ull << 30) ? 3 : req->page_size == (1ull << 21) ? 2 : 1;
	uint64_t *leaves = NULL;

	req->done = 0;
	req->allocated = 0;
	while (req->done < req->npages) {
		uint64_t gva = req->gva + req->done * req->page_size;
		uint64_t *table = pt_table(req, pools, req->cr3 & KVMPY_PTE_ADDR);
		unsigned int idx;

		req->fail_gva = gva;
		if (!table)
			return KVMPY_PT_FOREIGN;
		for (int level = 4; level > leaf_level; level--) {
			uint64_t *e = &table[(gva >> (12 + 9 * (level - 1))) & 511];
			uint64_t child;

			if (*e & KVMPY_PTE_P) {
				if (level <= 3 && (*e & KVMPY_PTE_PS))
					return KVMPY_PT_IN_HUGE;
				child = *e & KVMPY_PTE_ADDR;
			} else {
				child = pt_alloc(req, pools);
				if (!child)
					return KVMPY_PT_EXHAUSTED;
				*e = child | req->table_bits;
			}
			table = pt_table(req, pools, child);
			if (!table)
				return KVMPY_PT_FOREIGN;
		}
		leaves = table;
		/* Fill this table's entries from gva's on, as far as the request goes. */
		for (idx = (gva >> (12 + 9 * (leaf_level - 1))) & 511; idx < 512 && req->done < req->npages;
		     idx++, req->done++) {
			uint64_t old = leaves[idx];

			if (leaf_level > 1 && (old & KVMPY_PTE_P) && !(old & KVMPY_PTE_PS)) {
				req->fail_gva = req->gva + req->done * req->page_size;
				return KVMPY_PT_OVER_TABLE;
			}
			leaves[idx] = (req->gpa + req->done * req->page_size) | req->leaf_bits;
		}
	}
	return KVMPY_PT_OK;
}
