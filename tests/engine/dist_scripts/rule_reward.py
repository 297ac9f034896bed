"""A rule reward for the data-parallel tests (a deterministic function of the text that varies
between completions, so the policy gets a gradient). It also
records how many completions this rank scored, in $RLFUSE_TEST_COUNTS/rank<r>.txt, and, when
$RLFUSE_TEST_DIE_RANK names this rank, kills the process on its second call (a rank that dies)."""
import os


def reward(prompts, completions):
    rank = os.environ.get("RANK", "0")
    out_dir = os.environ.get("RLFUSE_TEST_COUNTS")
    calls = 0
    if out_dir:
        path = os.path.join(out_dir, f"rank{rank}.txt")
        calls = len(open(path).read().split()) if os.path.exists(path) else 0
        with open(path, "a") as fh:
            fh.write(f"{len(completions)}\n")
    if os.environ.get("RLFUSE_TEST_DIE_RANK") == rank and calls >= 1:
        os._exit(3)  # no exception, no cleanup: the other rank is left waiting in a collective
    return [(sum(map(ord, c)) % 7) / 7.0 + 0.1 * len(c) for c in completions]
