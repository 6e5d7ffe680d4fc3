"""The default run, dropless dispatch: the same loss at each of its first 20 steps on meshes (1, 1), (2, 4), (8, 1), (1, 8)."""

from mesh_equality import check_the_same_loss_at_every_step_on_every_mesh


def test_the_default_run_with_dropless_dispatch_logs_the_same_loss_on_every_mesh(tmp_path):
  check_the_same_loss_at_every_step_on_every_mesh(tmp_path, "dropless")
