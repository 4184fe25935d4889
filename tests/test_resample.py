

def test_each_output_chunk_reads_only_the_input_blocks_under_it():
    from dask.optimization import cull

    x = np.zeros((200, 300), np.float32)
    img = Image(data=da.from_array(x, chunks=(20, 30)), axes=("y", "x"))  # 10 x 10 input blocks
    out = resample(img, (0.5, 0.5), order=1, chunks=(40, 60))  # 400 x 600: 10 x 10 output chunks
    block = out.data.blocks[4, 7]
    graph = dict(block.__dask_graph__())
    kept, _ = cull(graph, block.__dask_keys__())
    inputs = {k for k in kept if isinstance(k, tuple) and k[0] == img.data.name}
    # output rows 160..199 read input rows 80..99.5 (+ halo): blocks 4 and maybe 3/5; likewise columns
    assert 1 <= len(inputs) <= 4, sorted(inputs)
