"""RELIABILITY.md's table states how many faults the tests inject; this recounts them from the tests' own
parametrization so the document cannot drift from the tests. (That every case survives is the other tests' job.)"""

from __future__ import annotations

import math
import re
from pathlib import Path

import test_fuzz as fuzz
import test_kernels as kernels_test
import test_native as native_test
import test_onednn as onednn_test
import test_reliability_atomic as atomic
import test_reliability_cli as cli
import test_reliability_crash as crash
import test_reliability_distributed as distributed
import test_reliability_images as images
import test_reliability_nonfinite as nonfinite
import test_reliability_weights as weights

DOC = Path(__file__).resolve().parents[1] / "RELIABILITY.md"


def cases(test) -> int:
    """Number of cases pytest generates from a test's parametrize marks (1 without any)."""
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    return math.prod(len(m.args[1]) for m in marks)


def drawn(test) -> int:
    """Examples hypothesis draws per case of a @given test with its own @settings."""
    return test._hypothesis_internal_use_settings.max_examples


def expected_rows() -> dict[str, int]:
    w, im, c = weights, images, cli
    n_big = len(fuzz.FUZZED) - 1
    return {
        "Weight file whose unpickling would run code": (
            cases(w.test_code_carrying_pickle_is_refused_and_never_runs)
            + cases(w.test_every_command_refuses_code_carrying_files)),
        "Truncated, empty, corrupt or foreign weight file / checkpoint": (
            cases(w.test_truncated_file_gives_clear_error) + cases(w.test_foreign_bytes_are_not_weights)
            + cases(w.test_corrupt_bytes_inside_zip) + cases(w.test_missing_file)
            + cases(w.test_every_command_reports_a_cut_checkpoint)),
        "Download: sha256 mismatch, cut connection, offline": (
            cases(w.test_sha256_mismatch_deletes_download) + cases(w.test_interrupted_download_leaves_nothing)
            + cases(w.test_offline_pretrained_gives_clear_error)),
        "Odd but valid image (mode, bit depth, EXIF, size)": (
            cases(im.test_unusual_image_is_converted_to_rgb) + cases(im.test_sixteen_bit_is_scaled_not_clipped)
            + cases(im.test_float_image_in_unit_range_is_scaled) + cases(im.test_transparent_pixels_become_white)
            + cases(im.test_cmyk_colours_survive) + cases(im.test_exif_orientation_is_applied)
            + cases(im.test_exif_rotated_jpeg_photo) + cases(im.test_one_pixel_image)),
        "Unusable image file (truncated, empty, not an image, bomb)": (
            cases(im.test_unusable_file_raises_data_error) + cases(im.test_bomb_guard_follows_pil_limit)
            + cases(im.test_aspect_ratio_limit) + cases(im.test_missing_file)),
        "Unusable images inside a train / eval / predict run": (
            # loader runs see each refused file once; the CLI run reads train/ and val/ in training, val/ in eval,
            # val/b in predict
            len(im.REFUSED) * (cases(im.test_loader_skips_and_counts_bad_files) + 2 + 1 + 1)),
        "SIGKILL of a training run": cases(crash.test_sigkill_then_resume_equals_uninterrupted_run) + 1,
        "Non-finite loss or gradient": (
            cases(nonfinite.test_nonfinite_update_stops_and_keeps_last_good_checkpoint) + 4),
        "Failed write / disk full": (
            cases(atomic.test_failed_write_keeps_the_old_file) + cases(atomic.test_disk_full_during_checkpoint_write)),
        "Bad invocation of the CLI": sum(cases(getattr(c, name)) for name in dir(c) if name.startswith("test_")
                                         and name != "test_debug_shows_the_traceback"),
        "Random input shapes (valid sizes)": 3 * (fuzz.FAST_EXAMPLES + n_big * fuzz.BIG_EXAMPLES),
        "Inputs the model cannot take": (
            cases(fuzz.test_too_small_input_gives_documented_error)
            * drawn(fuzz.test_too_small_input_gives_documented_error)
            + cases(fuzz.test_min_input_size_is_exact) + cases(fuzz.test_wrong_layout_gives_documented_error)
            + cases(fuzz.test_integer_images_give_documented_error)),
        "Dead or hung rank in 2-process DDP": cases(
            distributed.test_surviving_rank_exits_with_clear_error_in_bounded_time) + 1,
        "GPU kernels fail to launch": cases(
            kernels_test.test_by_default_a_failed_kernel_launch_warns_once_and_the_eager_ops_take_over)
            + cases(kernels_test.test_a_failed_fused_mlp_launch_warns_once_and_the_eager_mlp_runs)
            + cases(kernels_test.test_a_failed_cpe_kernel_launch_warns_once_and_the_eager_cpe_runs),
        "Native CPU kernels cannot be built or loaded": (
            cases(native_test.test_no_compiler_means_the_eager_ops_silently)
            + cases(native_test.test_a_failing_compiler_warns_once_and_the_eager_ops_run)
            + cases(native_test.test_a_damaged_library_file_is_rebuilt)),
        "oneDNN's linear layers fail": cases(
            onednn_test.test_a_failing_onednn_call_warns_once_and_pytorch_layers_take_over),
    }


def doc_rows() -> dict[str, tuple[int, int]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"\d+", cells[1]) and re.fullmatch(r"\d+", cells[2]):
            rows[cells[0]] = (int(cells[1]), int(cells[2]))
    return rows


def test_reliability_table_matches_the_tests():
    expected, documented = expected_rows(), doc_rows()
    assert documented.keys() == expected.keys()
    for name, n in expected.items():
        injected, survived = documented[name]
        assert injected == n, f"{name}: RELIABILITY.md says {injected} injected, the tests inject {n}"
        assert survived == injected, f"{name}: every injected case is expected to survive (the tests assert it)"
