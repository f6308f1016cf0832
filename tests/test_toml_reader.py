"""lib_lora.toml_reader's own parser (used on Python 3.10) against the standard reader on the same documents."""
from __future__ import annotations

import importlib
import math

import pytest

from lib_lora import toml_reader


def _oracle():
    """tomllib (3.11+), else the tomli that pip vendors: a reader nobody here wrote."""
    for name in ("tomllib", "tomli", "pip._vendor.tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("no reference TOML reader importable")


VALID = [
    "",
    "# only a comment\n\n",
    'a = 1\nb = -2\nc = +3\nd = 1_000\ne = 0xDEAD_beef\nf = 0o755\ng = 0b1101\nh = 0\n',
    "f1 = 1.0\nf2 = -3.5e-3\nf3 = 6.626e-34\nf4 = 5e+22\nf5 = 224_617.445_991\nf6 = inf\nf7 = -inf\nf8 = 1E6\n",
    't = true\nf = false\n',
    's = "tab\\there \\"q\\" \\\\ \\u00e9 \\U0001F600"\nl = \'C:\\path\\no escapes\'\n',
    's = """\nRoses are red\nViolets are blue"""\nt = """one \\\n     two \\\n  three"""\nq = """x""\"""\n',
    "l = '''\nfirst\n  second\\n'''\nq = '''a''''\n",
    'arr = [1, 2, 3]\nnested = [[1, 2], ["a", "b"]]\nmixed = [1, "a", 2.5, true]\n'
    'multi = [\n  "a", # comment\n  "b",\n]\nempty = []\n',
    'point = { x = 1, y = 2 }\nnest = { a = { b = { c = 1 } } }\nempty = {}\ndotted = { a.b = 1, a.c = 2 }\n',
    'name = "top"\n[table]\nkey = "v"\n[table.sub]\nk2 = 2\n[other."quoted key".x]\ny = 1\n',
    'fruit.apple.color = "red"\nfruit.apple.taste.sweet = true\n"site".\'google.com\' = true\n a . b = 3\n',
    '[[products]]\nname = "Hammer"\n[[products]]\n[[products]]\nname = "Nail"\ncolor = "gray"\n',
    '[[fruits]]\nname = "apple"\n[fruits.physical]\ncolor = "red"\n[[fruits.varieties]]\nname = "red delicious"\n'
    '[[fruits.varieties]]\nname = "granny smith"\n[[fruits]]\nname = "banana"\n[[fruits.varieties]]\nname = "plantain"\n',
    '[x.y.z.w]\n[x]\nk = 1\n',
    '[fruit]\napple.color = "red"\n[fruit.apple.texture]\nsmooth = true\n',
    "odt1 = 1979-05-27T07:32:00Z\nodt2 = 1979-05-27T00:32:00-07:00\nodt3 = 1979-05-27T00:32:00.999999+01:30\n"
    "ldt = 1979-05-27 07:32:00\nld = 1979-05-27\nlt = 07:32:00.5\n",
    'key = "value" # trailing comment\r\nother = 2\r\n',
    # a kohya dataset config and a kohya_ss GUI preset, as their tools write them
    '[general]\nshuffle_caption = true\ncaption_extension = ".txt"\nkeep_tokens = 1\n\n'
    '[[datasets]]\nresolution = 512\nbatch_size = 4\n\n  [[datasets.subsets]]\n  image_dir = \'C:\\hoge\'\n'
    '  class_tokens = "hoge girl"\n  num_repeats = 10\n\n  [[datasets.subsets]]\n  image_dir = "/reg"\n'
    '  is_reg = true\n\n[[datasets]]\nresolution = [768, 512]\nbatch_size = 2\n  [[datasets.subsets]]\n'
    '  image_dir = "/fuga"\n  caption_extension = ".caption"\n',
    'pretrained_model_name_or_path = "/m/v1-5.safetensors"\nnetwork_args = [ "conv_dim=4", "conv_alpha=1",]\n'
    'learning_rate = 0.0001\nmax_train_epochs = 10\nsave_model_as = "safetensors"\nxformers = true\n',
]

INVALID = [
    "a = 1\na = 2\n",
    "[t]\n[t]\n",
    "a = \n",
    'a = "unterminated\n',
    "a = [1, 2\n",
    "a = { x = 1\n",
    "a = 01\n",
    "a = 1.\n",
    "a = .5\n",
    "= 1\n",
    "a = 1 b = 2\n",
    'a = "\\q"\n',
    "a = {x = 1}\na.y = 2\n",
    "a.b = 1\n[a.b]\n",
    "[a]\nb = 1\n[a.b]\n",
    "arr = [1]\n[[arr]]\n",
    "a = 1979-13-01\n",
    "a = true2\n",
    "a = 1__0\n",
    'a = """x""""""\n',
]


@pytest.mark.parametrize("doc", VALID)
def test_parser_agrees_with_the_reference(doc):
    ours = toml_reader.parse(doc)
    ref = _oracle().loads(doc)
    assert _normal(ours) == _normal(ref)


@pytest.mark.parametrize("doc", INVALID)
def test_parser_refuses_what_the_reference_refuses(doc):
    oracle = _oracle()
    with pytest.raises(oracle.TOMLDecodeError):
        oracle.loads(doc)
    with pytest.raises(toml_reader.TOMLDecodeError, match="line"):
        toml_reader.parse(doc)


def test_nan_is_read():
    assert math.isnan(toml_reader.parse("a = nan\nb = -nan")["a"])


def test_loads_reports_one_error_type():
    with pytest.raises(toml_reader.TOMLDecodeError):
        toml_reader.loads("a = = 1")


def _normal(v):
    """NaN compares equal to itself; everything else as it is."""
    if isinstance(v, dict):
        return {k: _normal(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_normal(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v
