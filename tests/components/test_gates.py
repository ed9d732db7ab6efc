from components.gates import Rule, decide


def test_pass_against_teacher_and_threshold():
    d = decide({"geneval": 0.86, "o": 6.6}, [Rule(metric="geneval", max_drop=0.01), Rule(metric="o", min=6.5)],
               teacher={"geneval": 0.865})
    assert d.passed and "teacher 0.865 - 0.01" in d.reason


def test_fail_names_the_metric_and_numbers():
    d = decide({"geneval": 0.80}, [Rule(metric="geneval", max_drop=0.01)], teacher={"geneval": 0.865})
    assert not d.passed and "geneval=0.8 < teacher 0.865 - 0.01" in d.reason


def test_missing_metric_or_teacher_fails():
    assert not decide({}, [Rule(metric="x", min=0)]).passed
    assert not decide({"x": 1}, [Rule(metric="x", max_drop=0.1)], teacher=None).passed
