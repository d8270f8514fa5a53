"""The one method-spec parser (`memtune.spec`): methods, options, techniques, lists with commas in values."""
import pytest

from memtune.methods import ConfigError
from memtune.spec import parse_spec, parse_specs, split_specs, with_techniques


@pytest.mark.parametrize("text,method,options,techniques", [
    ("lora", "lora", {}, ()),
    ("lora:r=16:alpha=32", "lora", {"r": "16", "alpha": "32"}, ()),
    ("lora:r=16+gc", "lora", {"r": "16"}, ("gc",)),
    ("lora+nf4+gc", "lora", {}, ("nf4", "gc")),
    ("lst:keep_layers=1,2,3+int8", "lst", {"keep_layers": "1,2,3"}, ("int8",)),
    ("dtl+", "dtl+", {}, ()),                         # a method whose name ends in '+'
    ("dtl++gc", "dtl+", {}, ("gc",)),
    ("dtl+:rank=4+gc", "dtl+", {"rank": "4"}, ("gc",)),
])
def test_parse_spec(text, method, options, techniques):
    s = parse_spec(text)
    assert (s.label, s.method, s.options, s.techniques) == (text, method, options, techniques)


def test_commas_start_a_spec_only_before_a_method_name():
    assert split_specs("lst:keep_layers=1,2,3,lora+gc") == ["lst:keep_layers=1,2,3", "lora+gc"]
    assert split_specs("full, lora ,dtl+,dtl++gc,") == ["full", "lora", "dtl+", "dtl++gc"]
    assert split_specs("lora,foo,bar") == ["lora", "foo", "bar"]          # named, then refused as unknown
    specs = parse_specs("lst:keep_layers=1,2,3,lora:r=4+nf4+gc,sherl+int8")
    assert [s.label for s in specs] == ["lst:keep_layers=1,2,3", "lora:r=4+nf4+gc", "sherl+int8"]


@pytest.mark.parametrize("methods,message", [
    ("foo,bar", "unknown method 'foo'"),
    ("lora+nf5", "unknown technique 'nf5' in 'lora+nf5'; allowed: gc, nf4, fp4, int8, offload"),
    ("lora+gc+gc", "technique 'gc' given twice"),
    ("lora+nf4+int8", "nf4 and int8 both quantize"),
    ("lora:r", "options must be key=value"),
    ("lora:r=1:r=2", "option 'r' given twice"),
    ("lora:rank=4", "lora: unknown option(s) rank"),
    ("full+fp4", "fp4 cannot be combined with full"),
    ("meft2+gc", "gc is not needed for meft2"),
    ("", "no methods given"),
])
def test_every_spec_is_checked_up_front(methods, message):
    with pytest.raises(ConfigError) as e:
        parse_specs(methods)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flags_add_techniques_to_every_row_once():
    assert with_techniques(["lora", "sherl+nf4", "full"], ["nf4", "gc"]) == ["lora+nf4+gc", "sherl+nf4+gc",
                                                                             "full+nf4+gc"]
    assert with_techniques(["lora"], []) == ["lora"]
