"""The corrections edgebuild makes to lm-eval's harness (``edgebuild.bench.harness``)."""
from jinja2 import Environment


def test_templates_compile_once_and_render_as_lm_eval_renders():
    import lm_eval.utils

    from edgebuild.bench import harness

    harness.adjust()
    harness.adjust()
    template = "{{question | regex_replace('\\\\s+', ' ')}}\nAnswer: {{choices[answer]}}"
    docs = [{"question": f"Is  {i}  even?", "choices": ["no", "yes"], "answer": i % 2} for i in range(50)]
    before = harness._compiled.cache_info()
    rendered = [lm_eval.utils.apply_template(template, doc) for doc in docs]
    after = harness._compiled.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 49
    fresh = Environment(keep_trailing_newline=True)
    fresh.filters["regex_replace"] = lm_eval.utils.regex_replace
    assert rendered == [fresh.from_string(template).render(**doc) for doc in docs]
    assert rendered[3] == "Is 3 even?\nAnswer: yes"


def test_missing_fields_still_fail_as_in_lm_eval():
    import jinja2
    import lm_eval.utils
    import pytest

    from edgebuild.bench import harness

    harness.adjust()
    with pytest.raises(jinja2.UndefinedError):
        lm_eval.utils.apply_template("{{missing}}", {"question": "q"})
