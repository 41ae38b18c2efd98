"""The static backend's captured shapes (what a step replays is tested on a GPU, test_backends.py)."""

from speccascade.engine.backends.graphs import TOKEN_BUCKETS, bucket, planned_shapes, row_buckets, window_buckets


def test_rows_are_powers_of_two_up_to_the_largest_batch():
    assert row_buckets(1) == (1,)
    assert row_buckets(5) == (1, 2, 4, 8)
    assert row_buckets(32) == (1, 2, 4, 8, 16, 32)


def test_windows_grow_by_at_most_twice_and_end_at_the_slot_length():
    assert window_buckets(4096) == (256, 512, 1024, 1536, 2048, 3072, 4096)
    assert window_buckets(3000) == (256, 512, 1024, 1536, 2048, 3000)
    assert window_buckets(100) == (100,)
    windows = window_buckets(1 << 15)
    assert all(b / a <= 2 for a, b in zip(windows, windows[1:]))


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    assert bucket(6, TOKEN_BUCKETS) == 8  # the verify of a block of 5
    assert bucket(17, TOKEN_BUCKETS) == 17 and bucket(18, TOKEN_BUCKETS) is None  # blocks over 16 run eagerly
    assert bucket(300, window_buckets(4096)) == 512


def test_the_cheapest_shapes_are_captured_first():
    shapes = planned_shapes(8, 2048)
    assert len(shapes) == len(set(shapes)) == 4 * len(TOKEN_BUCKETS) * 5
    assert shapes[0].window == 256 and shapes[0].cells == 1
    assert [s.window for s in shapes] == sorted(s.window for s in shapes)
