"""The repository cites only what a reader of the repository can open.

Every text file git tracks (or would: untracked files that are not ignored) is scanned for
- the project's private decision sheet cited by section (an upper-case S-P-E-C word) and any path
  under a `reference` folder: neither is in the repository;
- every path-like mention ending in .md, .py or .txt. It must be a tracked file (README.md, train.py,
  requirements.txt, test_*.py), or a VTAB-1k split file of the user's data folder (train800.txt, ...),
  or a file one of the project's scripts writes (OUTPUT_FILES, by exact name), or belong to a named external
  source: the path comes after one of EXTERNAL (an official repository as owner/name) in the same
  sentence, or right after one of SHORT ("SA²VP's datasets.py"), or lies
  inside an installed package ("timm/models/vision_transformer.py"). A .md file must be tracked or
  follow an owner/name: a short name is not enough there, so no private note passes as "VPT's notes".
Add a source to EXTERNAL when the code cites a new one.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

# official repositories cited by owner/name (the sentence after one may name its files)
EXTERNAL = ('KMnP/vpt', 'WangYZ1608/Self-Prompt-Tuning', 'tommy-xq/SA2VP', 'ryongithub/GatedPromptTuning',
            'facebookresearch/mae', 'facebookresearch/moco-v3', 'huggingface/pytorch-image-models',
            'karpathy/nanoGPT', 'ZhangYuanhan-AI/NOAH', 'jeonsworld/ViT-pytorch', 'google-research/task_adaptation',
            'tensorflow/tensorflow', 'tensorflow/datasets')
# their short names: only a file named right after them ("VPT's optimizer.py", "NOAH get_vtab1k.py")
SHORT = ('VPT', 'SPT', 'SA²VP', 'SA2VP', 'GaPT', 'NOAH', 'MAE', 'MoCo v3', 'nanoGPT', 'timm', 'task_adaptation')
# installed packages, whose files every user has: a path inside one names its source
PACKAGES = ('timm',)
# files of the user's data folder, not of this repository (data.py's VTAB-1k layout)
DATA_FILES = {'train800.txt', 'val200.txt', 'train800val200.txt', 'test.txt'}
# files the project's scripts write (sweep.py's report and failure lists, a saved --print-commands): by exact name
OUTPUT_FILES = {'results.md', 'sweep_failed.txt', 'grid_failed.txt', 'cmds.txt'}

PRIVATE = [(re.compile(r'\bS[P]EC\b'), "cites the private decision sheet; cite the paper or the official code"),
           (re.compile(r'\breference[/\\]', re.I), "points into a reference folder that is not in the repository")]
PART = r'(?:[\w.<>*+-]|\{[^{}\s]*\})'   # a character of a file name, or a {a,b} group of a template
PATH = re.compile(rf'(?<![\w./<>{{}}*+-])((?:{PART}+/)*{PART}+\.(?:md|py|txt))(?![\w/-])')
URL = re.compile(r'\b\w+://\S+')
COMMENT = re.compile(r'(?m)^[ \t]*#+')
SENTENCE_END = re.compile(r'[.;!?](?:\s|$)|\n\s*\n|\|')
NAMES = '|'.join(re.escape(n) for n in sorted(EXTERNAL, key=len, reverse=True))
FULL_NAME = re.compile(rf'(?<![\w/-])(?:{NAMES})(?![\w-])')
SHORT_BEFORE = re.compile(rf'(?<![\w-])(?:{"|".join(re.escape(n) for n in SHORT)})(?:\'s)?\s+[`\'"(]?$')


def tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                             cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split('\0') if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked archive)
        skip = {'.git', '.venv', '__pycache__', '.pytest_cache', 'runs', 'data', 'out'}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob('*')
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return sorted(f for f in files if (ROOT / f).is_file())


def read_text(path):
    """The file's text, or None for a binary file."""
    raw = path.read_bytes()
    if b'\0' in raw:
        return None
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return None


def template_regex(path):
    """'test_*.py', '<task>/{split}.txt' -> a regex over paths ('*', <...>, {...} = any name part)."""
    parts = re.split(r'(\*|<[^>]*>|\{[^}]*\})', path)
    return re.compile(''.join('[^/]*' if i % 2 else re.escape(p) for i, p in enumerate(parts)) + '$')


def attributed(text, start, md):
    """Whether the path mention at text[start:] belongs to a named external source."""
    before = text[max(0, start - 300):start]
    cut = [m.end() for m in SENTENCE_END.finditer(before)]
    sentence = before[cut[-1]:] if cut else before
    if FULL_NAME.search(sentence):
        return True
    return not md and bool(SHORT_BEFORE.search(before[-40:]))


def violations(text, files):
    """(line number, problem) for each citation in `text` that a reader of the repository cannot open."""
    found = []
    line_of = lambda i: text.count('\n', 0, i) + 1  # noqa: E731
    for pattern, why in PRIVATE:
        found += [(line_of(m.start()), f"{m.group(0)!r} {why}") for m in pattern.finditer(text)]
    scan = URL.sub(lambda m: ' ' * len(m.group(0)), text)   # a URL is its own citation
    scan = COMMENT.sub(lambda m: ' ' * len(m.group(0)), scan)  # a comment wrapped over lines reads on
    for m in PATH.finditer(scan):
        path = m.group(1)
        name = path.rsplit('/', 1)[-1]
        if path in files or path.removeprefix('./') in files or name in DATA_FILES | OUTPUT_FILES:
            continue
        if any(c in path for c in '*<{') and (any(template_regex(path).match(f) for f in files)
                                              or any(template_regex(name).match(f) for f in DATA_FILES)):
            continue
        if path.split('/', 1)[0] in PACKAGES or attributed(scan, m.start(), path.endswith('.md')):
            continue
        found.append((line_of(m.start()), f"mentions {path!r}, which is not in the repository "
                                          "(name its official repository, e.g. 'KMnP/vpt src/...', or drop it)"))
    return sorted(found)


def test_no_citation_of_files_outside_the_repository():
    files = tracked_files()
    assert 'README.md' in files and 'test_repo.py' in files, files
    problems = []
    for f in files:
        text = read_text(ROOT / f)
        if text is not None:
            problems += [f"{f}:{line}: {why}" for line, why in violations(text, set(files))]
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('text, bad', [
    ('see S' + 'PEC §4 for the recipe', True),
    ('decisions in ' + 'reference' + '/notes' + '.md §3', True),
    ('as written in notes' + '.md', True),
    ('the reading of design_notes' + '.md §3.5', True),
    ("VPT's notes" + '.md', True),                                   # a short name does not vouch for .md
    ('KMnP/vpt says so. The reading: lspt_reading' + '.py', True),   # the attribution ended with the sentence
    ('scripts/make_table' + '.py writes it', True),
    ('Official code: KMnP/vpt src/models/vit_prompt/vit' + '.py (forward_deep_prompt) and vit_mae' + '.py', False),
    ("SA²VP's datasets" + '.py reads them', False),
    ("# t is set in SA²VP's\n# vit_tinypara" + '.py', False),
    ('timm `models/vision_transformer' + '.py`', False),
    ("timm's loader (timm/models/vision_transformer" + '.py)', False),
    ('as timm does; see notes' + '.py', True),
    ('README.md, train.py and requirements.txt', False),
    ('the test_*.py files', False),
    ('vtab-1k/<task>/train800val200' + '.txt', False),
    ('vtab-1k/<task>/{train800,val200,test}' + '.txt', False),
    ('notes/*' + '.md', True),
    ('the report in DIR/results' + '.md', False),                  # a file sweep.py writes
    ('see my_results' + '.md', True),
    ('https://example.org/notes' + '.md', False),
])
def test_the_rule_itself(text, bad):
    files = {'README.md', 'train.py', 'requirements.txt', 'test_repo.py'}
    assert bool(violations(text, files)) == bad, violations(text, files)
