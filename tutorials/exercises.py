"""Grading the tutorials' exercises: a check that has first proved it can tell right from wrong.

Every exercise cell ends with

    grade("Exercise 1.2", check, answer=my_answer, solution=solution, wrong=known_slip)

`check(x)` asserts that x is right, against an oracle that does not share the student's code
(finite differences, a dense mask written as a loop, the library's own output, a published
count). Before it looks at the student's answer, `grade` checks the checker: it must accept
`solution` (the hidden cell above the grading cell) and reject `wrong`, usually the very slip
the exercise is about. So a test run, where every answer is still None, proves each checker
passes a right answer and fails a wrong one; a student's run then grades their answer.
"""

from __future__ import annotations


class NotCaught(AssertionError):
    """The checker accepted an answer known to be wrong: it would pass anything."""


def grade(title, check, answer, solution, wrong):
    """Check the checker on `solution` and `wrong`, then grade `answer` (None: not tried yet)."""
    check(solution)
    try:
        check(wrong)
    except AssertionError:
        pass
    else:
        raise NotCaught(f"{title}: the check accepted a known-wrong answer")
    if answer is None:
        print(f"{title}: not answered yet (set your answer above and run this cell again; a solution "
              "is in the hidden cell)")
        return False
    check(answer)
    print(f"{title}: right")
    return True
