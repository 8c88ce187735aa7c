// Device kernels of pagetable's GPU path: one source for ROCm (hiprtc) and CUDA (NVRTC).
//
// The subset used here compiles unchanged under hiprtc with no includes added (as CuPy
// does it on ROCm), under NVRTC, under hipcc/nvcc, and as plain C++ under
// tests/kernel_emulation/grid_emulation.h, which is how CI checks the logic without a GPU:
//   * every kernel is `extern "C" __global__` with explicit `int` / `long long` arguments;
//   * no standard headers, no warp intrinsics, no shared memory, no barriers, and no
//     assumption about the warp or wavefront width (64 on CDNA, 32 on RDNA and NVIDIA);
//   * every loop is a grid-stride loop, so any launch shape gives the same result and the
//     host may bound the grid freely.
//
// The device table is dense: `block_table[row * table_width + logical_block]` holds the
// physical block id of a row's logical block, and `row_lengths[row]` how many of the row's
// entries are mapped.  Entries past a row's length hold PAD_SLOT_ID.  Rows are what
// pagetable.gpu.DeviceBlockTable assigns to sequences; the host maps sequence ids to rows.
//
// Anything out of range (a row outside the table, a negative position, a position past the
// row's mapped blocks) yields PAD_SLOT_ID and is never used to index memory.

#define PAD_SLOT_ID (-1)

// The one place that says what a (row, position) pair maps to.  Returns the physical block
// id and stores the offset inside the block, or PAD_SLOT_ID in both when unmapped.
// block_shift is log2(block_size) when block_size is a power of two, else -1; the shift
// and mask replace a 64-bit division, which is slow on every GPU.
__device__ inline int lookup_block(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    int block_size, int block_shift, int row, long long position, int* offset)
{
    *offset = PAD_SLOT_ID;
    if (row < 0 || row >= num_rows || position < 0) {
        return PAD_SLOT_ID;
    }
    long long logical_block;
    long long offset_in_block;
    if (block_shift >= 0) {
        logical_block = position >> block_shift;
        offset_in_block = position & (long long)(block_size - 1);
    } else {
        logical_block = position / block_size;
        offset_in_block = position - logical_block * block_size;
    }
    // A row length above the table width would be a host bug; clamping it here keeps the
    // read inside the row whatever the host uploaded.
    int mapped_blocks = row_lengths[row];
    if (mapped_blocks > table_width) {
        mapped_blocks = table_width;
    }
    if (logical_block >= mapped_blocks) {
        return PAD_SLOT_ID;
    }
    int block_id = block_table[(long long)row * table_width + logical_block];
    if (block_id < 0) {
        return PAD_SLOT_ID;
    }
    *offset = (int)offset_in_block;
    return block_id;
}

// Number of blocks of a row that kernels may read: 0 for a row outside the table.
__device__ inline int readable_blocks(const int* row_lengths, int num_rows, int table_width, int row)
{
    if (row < 0 || row >= num_rows) {
        return 0;
    }
    int mapped_blocks = row_lengths[row];
    if (mapped_blocks < 0) {
        return 0;
    }
    return mapped_blocks < table_width ? mapped_blocks : table_width;
}

// Batched lookup: query i is (rows[i], positions[i]) -> (block_ids_out[i], offsets_out[i]).
// One thread per query, grid-stride.  Mirrors PageTable.lookup.
extern "C" __global__ void pagetable_lookup(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    int block_size, int block_shift,
    const int* rows, const long long* positions, long long num_queries,
    int* block_ids_out, int* offsets_out)
{
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_queries; i += stride) {
        int offset;
        int block_id = lookup_block(block_table, row_lengths, num_rows, table_width,
                                    block_size, block_shift, rows[i], positions[i], &offset);
        block_ids_out[i] = block_id;
        offsets_out[i] = offset;
    }
}

// Slot mapping for (row, position) pairs: block_id * block_size + offset, PAD_SLOT_ID where
// unmapped.  One thread per token, grid-stride.  Mirrors PageTable.slot_mapping.
extern "C" __global__ void pagetable_slot_mapping(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    int block_size, int block_shift,
    const int* rows, const long long* positions, long long num_tokens,
    long long* slot_mapping_out)
{
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_tokens; i += stride) {
        int offset;
        int block_id = lookup_block(block_table, row_lengths, num_rows, table_width,
                                    block_size, block_shift, rows[i], positions[i], &offset);
        slot_mapping_out[i] = block_id == PAD_SLOT_ID
            ? (long long)PAD_SLOT_ID
            : (long long)block_id * block_size + offset;
    }
}

// Slot mapping from a batch description, so the host never builds per-token arrays.
// Request r owns the tokens query_start_loc[r] .. query_start_loc[r + 1] - 1 of the output;
// its first token sits at position first_positions[r] of sequence row rows[r], the next at
// first_positions[r] + 1, and so on.  The grid is 2-D: blockIdx.y walks requests, the x
// dimension walks token tiles inside a request, so no thread needs a prefix sum over the
// other requests.  Output entries outside [query_start_loc[0], query_start_loc[num_requests])
// up to out_length are padding (PAD_SLOT_ID), which lets the output keep one fixed length
// across steps (a captured graph replays the same launch).  When write_positions is non-zero
// the per-token positions go to positions_out too (PAD_SLOT_ID on padding).
// query_start_loc must be non-decreasing; entries past out_length are never written.
extern "C" __global__ void pagetable_slot_mapping_from_batch(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    int block_size, int block_shift,
    const int* rows, const int* query_start_loc, const long long* first_positions,
    int num_requests, long long out_length,
    long long* slot_mapping_out, int write_positions, long long* positions_out)
{
    long long tile_stride = (long long)blockDim.x * gridDim.x;
    for (int request = blockIdx.y; request < num_requests; request += gridDim.y) {
        long long query_start = query_start_loc[request];
        long long query_end = query_start_loc[request + 1];
        if (query_end > out_length) {
            query_end = out_length;
        }
        int row = rows[request];
        long long first_position = first_positions[request];
        long long token = query_start + (long long)blockIdx.x * blockDim.x + threadIdx.x;
        // A negative start would be a host bug; skip to the first writable token.
        if (token < 0) {
            token += ((-token + tile_stride - 1) / tile_stride) * tile_stride;
        }
        for (; token < query_end; token += tile_stride) {
            long long position = first_position + (token - query_start);
            int offset;
            int block_id = lookup_block(block_table, row_lengths, num_rows, table_width,
                                        block_size, block_shift, row, position, &offset);
            slot_mapping_out[token] = block_id == PAD_SLOT_ID
                ? (long long)PAD_SLOT_ID
                : (long long)block_id * block_size + offset;
            if (write_positions) {
                positions_out[token] = position;
            }
        }
    }

    // Padding: the whole grid shares the tokens no request owns, before the batch's first
    // token and after its last, walking only those ranges.
    long long thread_index =
        ((long long)blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    long long num_threads = (long long)gridDim.x * gridDim.y * blockDim.x;
    long long batch_start = query_start_loc[0];
    long long batch_end = query_start_loc[num_requests];
    if (batch_end < batch_start) {
        batch_end = batch_start;
    }
    long long head_end = batch_start < out_length ? batch_start : out_length;
    long long tail_start = batch_end > 0 ? batch_end : 0;
    for (long long token = thread_index; token < head_end; token += num_threads) {
        slot_mapping_out[token] = PAD_SLOT_ID;
        if (write_positions) {
            positions_out[token] = PAD_SLOT_ID;
        }
    }
    for (long long token = tail_start + thread_index; token < out_length; token += num_threads) {
        slot_mapping_out[token] = PAD_SLOT_ID;
        if (write_positions) {
            positions_out[token] = PAD_SLOT_ID;
        }
    }
}

// Gathers the batch's rows of the device table into a dense [num_requests, out_width] block
// table plus the block count of each (PAD_SLOT_ID past a row's length, 0 blocks for a row
// outside the table).  2-D grid: blockIdx.y walks requests, x walks the columns.
// Mirrors PageTable.block_table.
extern "C" __global__ void pagetable_gather_block_table(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    const int* rows, int num_requests, int out_width,
    int* block_table_out, int* num_blocks_out)
{
    long long column_stride = (long long)blockDim.x * gridDim.x;
    for (int request = blockIdx.y; request < num_requests; request += gridDim.y) {
        int row = rows[request];
        int num_blocks = readable_blocks(row_lengths, num_rows, table_width, row);
        if (num_blocks > out_width) {
            num_blocks = out_width;
        }
        long long first_column = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (first_column == 0) {
            num_blocks_out[request] = num_blocks;
        }
        for (long long column = first_column; column < out_width; column += column_stride) {
            block_table_out[(long long)request * out_width + column] = column < num_blocks
                ? block_table[(long long)row * table_width + column]
                : PAD_SLOT_ID;
        }
    }
}

// CSR page list, step 1: kv_indptr (and kv_last_page_len when token counts are given).
// An exclusive prefix sum over the batch, run by one thread: it is O(num_requests) with
// independent loads, a few microseconds for thousands of requests, and keeps the whole CSR
// build on the device with no host round trip, so it can be captured in a graph.
// Launch with one block of one thread (extra threads return at once).
// With token counts, request r covers min(token_counts[r], blocks * block_size) tokens, in
// ceil(tokens / block_size) pages, the last holding 1 .. block_size tokens (0 when empty);
// without them it covers every mapped block of its row.
extern "C" __global__ void pagetable_csr_indptr(
    const int* row_lengths, int num_rows, int table_width, int block_size,
    const int* rows, int num_requests,
    int has_token_counts, const int* token_counts,
    int* indptr_out, int* last_page_len_out)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    long long running_total = 0;
    indptr_out[0] = 0;
    for (int request = 0; request < num_requests; request++) {
        int num_pages = readable_blocks(row_lengths, num_rows, table_width, rows[request]);
        if (has_token_counts) {
            long long tokens = token_counts[request];
            long long capacity = (long long)num_pages * block_size;
            if (tokens < 0) {
                tokens = 0;
            }
            if (tokens > capacity) {
                tokens = capacity;
            }
            num_pages = (int)((tokens + block_size - 1) / block_size);
            last_page_len_out[request] =
                num_pages > 0 ? (int)(tokens - (long long)(num_pages - 1) * block_size) : 0;
        }
        running_total += num_pages;
        indptr_out[request + 1] = (int)running_total;
    }
}

// CSR page list, step 2: kv_indices[indptr[r] + j] = block j of request r's row.
// 2-D grid: blockIdx.y walks requests, x walks a request's pages.  Never writes at or past
// indices_capacity, so a fixed-size output buffer cannot be overrun.
extern "C" __global__ void pagetable_csr_indices(
    const int* block_table, const int* row_lengths, int num_rows, int table_width,
    const int* rows, int num_requests, const int* indptr,
    long long indices_capacity, int* indices_out)
{
    long long page_stride = (long long)blockDim.x * gridDim.x;
    for (int request = blockIdx.y; request < num_requests; request += gridDim.y) {
        int row = rows[request];
        long long first_index = indptr[request];
        long long num_pages = (long long)indptr[request + 1] - first_index;
        long long readable = readable_blocks(row_lengths, num_rows, table_width, row);
        if (num_pages > readable) {
            num_pages = readable;
        }
        for (long long page = (long long)blockIdx.x * blockDim.x + threadIdx.x; page < num_pages;
             page += page_stride) {
            long long index = first_index + page;
            if (index >= 0 && index < indices_capacity) {
                indices_out[index] = block_table[(long long)row * table_width + page];
            }
        }
    }
}

// Incremental upload: applies one packed batch of updates to the device table.
// `updates` holds num_cell_updates triples (row, column, block_id) followed by
// num_length_updates pairs (row, new_length).  A length update sets the row's length and
// writes PAD_SLOT_ID over the entries from new_length up to the row's old length, so a
// released or shrunk row reads as padding again.  The host sends at most one length update
// per row and only cell updates below that row's new length, so no two threads touch the
// same entry.  One thread per update, grid-stride; updates outside the table are skipped.
extern "C" __global__ void pagetable_apply_updates(
    int* block_table, int* row_lengths, int num_rows, int table_width,
    const int* updates, int num_cell_updates, int num_length_updates)
{
    long long num_updates = (long long)num_cell_updates + num_length_updates;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_updates; i += stride) {
        if (i < num_cell_updates) {
            int row = updates[3 * i];
            int column = updates[3 * i + 1];
            int block_id = updates[3 * i + 2];
            if (row >= 0 && row < num_rows && column >= 0 && column < table_width) {
                block_table[(long long)row * table_width + column] = block_id;
            }
        } else {
            long long pair = 3LL * num_cell_updates + 2 * (i - num_cell_updates);
            int row = updates[pair];
            int new_length = updates[pair + 1];
            if (row < 0 || row >= num_rows) {
                continue;
            }
            if (new_length < 0) {
                new_length = 0;
            }
            if (new_length > table_width) {
                new_length = table_width;
            }
            int old_length = readable_blocks(row_lengths, num_rows, table_width, row);
            for (int column = new_length; column < old_length; column++) {
                block_table[(long long)row * table_width + column] = PAD_SLOT_ID;
            }
            row_lengths[row] = new_length;
        }
    }
}
