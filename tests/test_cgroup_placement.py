"""Where dualblade.bench.cgroup makes its memory-limited children under cgroup v2 (a tree of real directories
standing in for /sys/fs/cgroup: the rule is about which group delegates "memory", not about the kernel)."""
from __future__ import annotations

from dualblade.bench import cgroup


def _group(path, delegates: bool):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.subtree_control").write_text("cpu memory pids\n" if delegates else "cpu pids\n")
    return path


def test_a_delegating_group_of_our_own_is_used(tmp_path):
    root = _group(tmp_path, True)
    own = _group(root / "user.slice" / "session", True)
    assert cgroup._v2_delegating(own, root) == own


def test_processes_moved_into_a_leaf_put_children_beside_it(tmp_path):
    # the GPU machine: a command's group (which offers memory) with every process moved into leaf/, and
    # +memory then written to the group's subtree_control (tools/gpu/device-test.sh)
    root = _group(tmp_path, False)
    command = _group(root / "process_api" / "a1b2", True)
    leaf = _group(command / "leaf", False)
    assert cgroup._v2_delegating(leaf, root) == command


def test_nothing_delegates_memory(tmp_path):
    root = _group(tmp_path, False)
    leaf = _group(root / "process_api" / "a1b2", False)
    assert cgroup._v2_delegating(leaf, root) is None


def test_the_search_stays_under_the_root(tmp_path):
    _group(tmp_path, True)  # above the cgroup root: never taken
    root = _group(tmp_path / "cg", False)
    leaf = _group(root / "x", False)
    assert cgroup._v2_delegating(leaf, root) is None
