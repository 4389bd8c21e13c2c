"""Which teacher layers each student layer is generated from (docs/method.md 3.1)."""

from typing import List


def layer_groups(teacher_layers: int, student_layers: int) -> List[range]:
    """Split ``teacher_layers`` into ``student_layers`` contiguous groups.

    Every teacher layer belongs to exactly one group and group sizes differ by
    at most one. When the depths divide, group i is ``[i*g, (i+1)*g)`` with
    ``g = teacher_layers // student_layers``: the authors' rule, exactly.
    """
    if student_layers < 1 or teacher_layers < student_layers:
        raise ValueError(
            f"cannot generate {student_layers} student layers from {teacher_layers} "
            "teacher layers: the student needs at least 1 and at most as many layers "
            "as the teacher"
        )
    bounds = [i * teacher_layers // student_layers for i in range(student_layers + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
