"""Tests of the experiments (experiments/*.py) on tiny budgets. Run from the repository root:

    python -m pytest -q experiments/test_experiments.py

Every script runs as it would from the command line (a fresh process, one thread) or, for its parts and its
one-line errors, in this process. The core's own tests are in test_all.py, which imports nothing from here.
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import common  # noqa: E402
import estimate  # noqa: E402
import figures  # noqa: E402
import gpu  # noqa: E402
import jvp_dtype  # noqa: E402
import mix  # noqa: E402
import model  # noqa: E402
import pipeline  # noqa: E402
import regress  # noqa: E402
import sample  # noqa: E402
import speed  # noqa: E402
import study  # noqa: E402
import tables  # noqa: E402
import uci_digits  # noqa: E402
import train  # noqa: E402

ROWS = ['e', 'g', 'i', 'r']                                           # the Table 3 variants the tests train
SCRIPTS = {'pipeline': pipeline, 'study': study, 'regress': regress, 'tables': tables, 'mix': mix, 'speed': speed,
           'jvp_dtype': jvp_dtype, 'gpu': gpu, 'estimate': estimate, 'figures': figures, 'uci_digits': uci_digits}
ENV = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
ENV.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', TQDM_DISABLE='1')


def run_script(name, *argv, timeout=300):
    """python experiments/<name>.py ARGV in a fresh process, one thread, from the repository root; returns stdout."""
    p = subprocess.run([sys.executable, os.path.join(HERE, f'{name}.py'), *map(str, argv)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def last_line(out):
    """The closing line of a script's output: `<script>: wrote ...`, naming what it wrote."""
    return out.strip().splitlines()[-1]


def one_error(capsys, fn, must=()):
    """fn() exits with code 2 and prints exactly one line, `error: ...`, holding every string of must."""
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
    for m in must:
        assert m in lines[0], (m, lines[0])
    return lines[0]


class Background:
    """Scripts that need no input, started at once in their own processes (one thread each) while the other tests
    run: on 2 cores most tests keep one busy. result(name) waits for one and returns its stdout."""

    def __init__(self, root, jobs):
        self.procs = {}
        for name, argv in jobs.items():
            out = root / name
            out.mkdir()
            log = open(out / 'log', 'w+')
            p = subprocess.Popen([sys.executable, os.path.join(HERE, f'{argv[0]}.py'), *map(str, argv[1:]),
                                  '--results', out], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
            self.procs[name] = (p, log, out)

    def result(self, name, timeout=600):
        p, log, out = self.procs[name]
        rc = p.wait(timeout)
        log.seek(0)
        text = log.read()
        assert rc == 0, text[-3000:]
        return text, out

    def close(self):
        for p, log, _ in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


@pytest.fixture(scope='module')
def background(tmp_path_factory):
    root = tmp_path_factory.mktemp('background')
    bg = Background(root, {
        'speed': ['speed', '--presets', 'tiny', '--batch', '8', '--repeats', '2', '--threads', '1'],
        'gpu': ['gpu', '--device', 'cpu', '--preset', 'tiny', '--max-batch', '2', '--repeats', '1', '--no-compile',
                '--budget', '400', '--threads', '1'],
        'estimate': ['estimate', '--preset', 'tiny', '--threads', '1'],
        'jvp_dtype': ['jvp_dtype', '--presets', 'tiny', '--seeds', '1', '--teacher-steps', '2', '--steps', '9',
                      '--batch', '8', '--runs', root / 'jvp_dtype_runs', '--threads', '1']})
    yield bg
    bg.close()


@pytest.fixture(scope='module')
def d8(tmp_path_factory, background):
    """200 built-in digits of 8x8 in the latents-folder format (the background scripts start with it)."""
    return train.make_digits(str(tmp_path_factory.mktemp('digits') / 'd8'), n=200, size=8)


@pytest.fixture(scope='module')
def tiny_tables(d8, tmp_path_factory):
    """experiments/tables.py on 8x8 digits: a 2-step teacher, the variants e g i of 2 steps (every other row is a
    run like these, and one train.py process costs seconds), 2 seeds, 20 samples per FD."""
    root = tmp_path_factory.mktemp('tables')
    data = d8
    argv = ['--data', data, '--teacher-steps', '2', '--decm-steps', '2', '--n', '20', '--batch', '32',
            '--runs', str(root / 'runs'), '--results', str(root / 'res'), '--seeds', '0', '1', '--threads', '1',
            '--rows', *ROWS]
    run_script('tables', *argv, '--jobs', '2')
    return root, argv


# ----------------------------------------------------------------------------- tables, regress, mix
def test_tables_writes_every_row_of_table_3_and_table_4(tiny_tables):
    root, _ = tiny_tables
    md = (root / 'res' / 'tables.md').read_text()
    number = r'(\d+\.\d\d \+- \d+\.\d\d|nan)'                          # mean +- sd over the 2 seeds
    row = [line for line in md.splitlines() if line.startswith('| (b*) ')]   # the distilled-velocity teacher
    assert len(row) == 1 and row[0].count(' +- ') == 4 and row[0].endswith('| - | - | - | - |'), md
    tables_part = md.split('## Orderings against the noise')[0]
    shown = [k for k, _, _, flags in tables.TABLE3 if k in 'ab' or k in ROWS or flags in ROWS]   # h, j, n: g's run
    assert ''.join(shown) == 'abeghijnr'
    for key, _, method, _ in tables.TABLE3:
        row = [line for line in tables_part.splitlines() if line.startswith(f'| ({key}) ')]
        assert len(row) == (key in shown), (key, md)
        if key not in shown:
            continue
        cells = [c.strip() for c in row[0].strip('|').split('|')[1:]]
        assert len(cells) == 8 and all(re.fullmatch(number, c) for c in cells[:4]), row
        assert cells[4:] == [f'{v:.2f}' for v in tables.PAPER_T3[key]] if key in tables.PAPER_T3 else ['-'] * 4
    assert '## Table 4' in md and 'r_max 0.05' in md and 'Command: python experiments/tables.py --data' in md
    for _, label, paper in tables.PAPER_T4:
        row = [line for line in md.splitlines() if line.startswith(f'| {label} |')]
        assert len(row) == 1 and row[0].rstrip(' |').endswith(f'{paper[-1]:.2f}'), (label, md)
    orderings = md.split('## Orderings against the noise')[1]
    for first, second, _ in tables.T3_PAIRS:                            # every pair, every column, a verdict
        row = [line for line in orderings.splitlines() if line.startswith(f'| ({first}) / ({second})')]
        assert len(row) == (first in shown and second in shown), (first, second, orderings)
        paper = r'(better|worse|equal)' if second in tables.PAPER_T3 else '(-)'    # (r): an ablation of ours
        assert not row or len(re.findall(r'(better|worse|within noise) \(' + paper + r'\)', row[0])) == 4, row
    raw = json.loads((root / 'res' / 'tables.json').read_text())
    cells = {(c['row'], c['sampler'], c['nfe']): c['fd'] for c in raw['fd']}
    assert all(len(v) == 2 for v in cells.values()) and raw['seeds'] == [0, 1]
    assert ('a', 'teacher', 50) in cells and ('b*', 'teacher', 50) in cells and ('g', 'mix', 16) in cells
    assert ('e', 'mix', 16) in cells and ('e', 'euler', 8) not in cells   # Table 4's Mix on (e): no N2N
    assert md.count('| Mix Sampler on (e), FM + CD: no N2N') == 1
    assert re.search(r'\| Mix on \(g\) against Mix on \(e\)[^|]*( \| (better|worse|within noise) \(-\)){4} \|', md), md
    assert ('h', 'cm', 1) not in cells                                  # (h), (j), (n) reuse the run of (g)
    assert cells['a', 'teacher', 50] != cells['b*', 'teacher', 50]      # (b*) is guided, (a) is not
    runs = [f'{k}-s{s}' for k in ROWS for s in (0, 1)]
    assert sorted(os.listdir(root / 'runs')) == sorted(['teacher', 'fd.json', 'grids', 'logs'] + runs)
    ck = train.load_student_checkpoint(train.latest_checkpoint(str(root / 'runs' / 'g-s1')))
    assert ck['args']['r_max'] == 0.05 and ck['args']['ema_warmup'] and ck['step'] == 2   # as recorded
    ck = train.load_student_checkpoint(train.latest_checkpoint(str(root / 'runs' / 'r-s1')))
    assert ck['args']['r_max'] == 1 and ck['args']['vpsi'] == 'pred'   # the row's own --r-max wins


def test_tables_png_and_sample_grids_are_valid_pngs(tiny_tables, tmp_path, capsys):
    root, argv = tiny_tables
    paths = [root / 'res' / 'tables.png'] + sorted((root / 'res' / 'tables_samples').glob('*.png'))
    assert len(paths) == 1 + 3 + len(ROWS) + 1                          # plot, rows a, b, b*, the variants, table4
    for p in paths:
        with Image.open(p) as im:
            im.verify()
            assert im.format == 'PNG'
    with Image.open(paths[0]) as im:
        assert im.width >= 800 and im.height >= 300                     # two panels
    before = {p.name: p.read_bytes() for p in paths[1:]} | {'json': (root / 'res' / 'tables.json').read_bytes()}
    stamp = os.path.getmtime(train.latest_checkpoint(str(root / 'runs' / 'g-s0')))
    tables.main(argv)                                                   # resumed: nothing trained, cells cached
    after = {p.name: p.read_bytes() for p in paths[1:]} | {'json': (root / 'res' / 'tables.json').read_bytes()}
    assert before == after
    assert os.path.getmtime(train.latest_checkpoint(str(root / 'runs' / 'g-s0'))) == stamp
    res, runs = root / 'res', root / 'runs'
    assert last_line(capsys.readouterr().out) == (f'tables: wrote {res}/tables.md, {res}/tables.json, {res}/tables.png, '
                                                  f'{res}/tables_samples/<row>.png; runs in {runs}/')
    tables.main(argv + ['--seeds', '0', '--results', str(tmp_path)])   # one seed (cached): no noise test
    orderings = (tmp_path / 'tables.md').read_text().split('## Orderings against the noise')[1]
    rows = [x for x in orderings.splitlines() if re.search(r'\((better|worse|equal)\) \|$', x)]
    assert len(rows) == 2 + 2, orderings                                # (g)/(e), (h)/(i); Table 4's two
    assert all(len(re.findall(r'\| n/a \(one seed\) \((better|worse|equal)\)', x)) == 4 for x in rows), rows
    assert last_line(capsys.readouterr().out).startswith(f'tables: wrote {tmp_path}/tables.md, ')


def test_tables_refuses_to_resume_a_run_made_with_other_settings(tiny_tables, capsys):
    _, argv = tiny_tables
    for change, message in [(['--decm-steps', '1'], 'more than the 1 asked for'),
                            (['--w-cfg', '3'], 'other settings'), (['--r-max', '0.2'], 'other settings'),
                            (['--rows', 'c', 'd'], 'with g'), (['--rows', 'g', 'x'], 'unknown: x')]:
        one_error(capsys, lambda: tables.main(argv + change), [message])   # the later flag wins


def test_regress_probe_fits_the_teachers_ode_map(tiny_tables, d8, tmp_path):
    """regress.py: pairs from the teacher's ODE on the distilled velocity, the one-step student fit to them:
    the pairs are the teacher sampler's output for their noise, every evaluation has every seed, and the
    ratio is against the cached distilled-velocity teacher of the same seed."""
    root, _ = tiny_tables
    fd_cache = tmp_path / 'fd.json'
    fd_cache.write_text(json.dumps({f'{common.APG_KEY}|50|{s}|20': 2.0 for s in (0, 1)}))
    out = run_script('regress', '--teacher', root / 'runs' / 'teacher', '--data', d8, '--runs', tmp_path,
                     '--pairs', '24', '--ode-steps', '3', '--batch', '8', '--eval-at', '2', '30', '--n', '20',
                     '--seeds', '0', '1', '--teacher-fd', fd_cache, '--threads', '1')
    assert last_line(out) == (f'regress: wrote {tmp_path}/regress.md, {tmp_path}/regress.json; the pairs in '
                              f'{tmp_path}/pairs_24_3.pt')
    pairs = torch.load(tmp_path / 'pairs_24_3.pt', weights_only=True)
    teacher, _, _ = sample.load_model(str(root / 'runs' / 'teacher'))
    x = sample.run_sampler(teacher, 'teacher', pairs['z'], pairs['y'], 3, args=common.teacher_args(2.0, 'apg', 0.05))
    torch.testing.assert_close(pairs['x'], x)                           # the ODE solution of the pair's noise
    rows = json.loads((tmp_path / 'regress.json').read_text())
    assert [r['step'] for r in rows] == [2, 30] and all(len(r['fd']) == 2 for r in rows)
    assert rows[0]['ratio'] == pytest.approx([f / 2.0 for f in rows[0]['fd']])
    assert '| 30 |' in (tmp_path / 'regress.md').read_text()


def test_mix_sweeps_the_switch(tiny_tables, d8, tmp_path, capsys):
    """mix.py: one row per --mix-det (0 = the CM sampler, equal in every column), one column per --mix-t."""
    root, _ = tiny_tables
    out, data = str(root / 'runs' / 'g-s0'), d8                         # a DE-CM run of the tables
    mix.main(['--ckpt', out, '--data', data, '--n', '20', '--nfe', '3', '--ts', '0.3', '0.6', '--threads', '1'])
    text = capsys.readouterr().out
    assert last_line(text) == 'mix: wrote no file (the table is above)'
    rows = [line for line in text.splitlines() if line.startswith('| ')]
    assert rows[0].startswith('| `--mix-det`') and rows[0].endswith('| 0.3 | 0.6 |'), text
    cells = [[float(c) for c in r.strip('|').split('|')[1:]] for r in rows[1:]]
    assert len(cells) == 3 and all(len(c) == 2 and all(np.isfinite(c)) for c in cells), text
    assert cells[0][0] == cells[0][1] and '(default)' in rows[2]
    mix.main(['--ckpt', out, out, '--seeds', '0', '1', '--data', data, '--n', '20', '--nfe', '3', '--ts', '0.3'])
    two = capsys.readouterr().out                                       # one checkpoint per seed: mean +- sd
    assert re.search(r"\| 1 \(default\) \| \d+\.\d\d \+- \d+\.\d\d \|", two), two
    ref = tmp_path / 'teacher_fd.json'              # ratios to the teacher's best at 50 steps (1 step is no baseline)
    ref.write_text(json.dumps({f'{common.APG_KEY}|50|0|20': 2.0, 'teacher, plain CFG w = 1|50|0|20': 1.6,
                               f'{common.APG_KEY}|1|0|20': 0.5, 'teacher, plain CFG w = 2|50|0|40': 0.1}))
    mix.main(['--ckpt', out, '--data', data, '--n', '20', '--nfe', '3', '--ts', '0.3', '--teacher-fd', str(ref)])
    text = capsys.readouterr().out
    assert "teacher's best setting at 50 steps in " + str(ref) + ' (teacher, plain CFG w = 1, FDs 1.600' in text, text
    rows = [line for line in text.splitlines() if line.startswith('| ') and not line.startswith('| `')]
    assert len(rows) == 6, text                                         # 3 FD rows, then 3 ratio rows
    for fd_row, ratio_row in zip(rows[:3], rows[3:]):
        fd, ratio = float(fd_row.split('|')[2]), float(ratio_row.split('|')[2].split(';')[0])
        assert abs(ratio * 1.6 - fd) < 0.006, (fd_row, ratio_row)       # FD / the best teacher's 1.6
        assert ratio_row.split('|')[2].strip().endswith('; n/a (one seed)'), ratio_row   # one seed: no test
    one_error(capsys, lambda: mix.main(['--ckpt', out, '--data', data, '--n', '30', '--teacher-fd', str(ref)]),
              ['--teacher-fd'])
    one_error(capsys, lambda: mix.main(['--ckpt', str(root / 'runs' / 'teacher'), '--data', data, '--n', '20']),
              ['flow-matching teacher'])


# ----------------------------------------------------------------------------- pipeline and study
def test_pipeline_distils_one_grid_step_weaker_than_the_best():
    grid = [3.0, 1.25, 2.0, 1.5]                                        # in any order
    assert [pipeline.weaker_weight(grid, b) for b in (3.0, 2.0, 1.5, 1.25)] == [2.0, 1.5, 1.25, 1.0]
    assert pipeline.weaker_weight([1.0, 2.0], 1.0) == 1.0 and pipeline.weaker_weight([0.5, 2.0], 0.5) == 0.5


def test_pipeline_preset_is_the_teachers_and_so_the_students(d8, tmp_path):
    a = pipeline.build_parser().parse_args(['--runs', str(tmp_path), '--teacher-steps', '1', '--batch', '8',
                                            '--data', d8, '--device', 'cpu', '--threads', '1', '--preset', 'small'])
    _, ckpt = common.train_teacher(a)
    assert train.load_student_checkpoint(ckpt)['model_config']['preset'] == 'small'
    assert model.student_from_teacher(sample.load_model(ckpt)[0]).config['preset'] == 'small'
    a = pipeline.build_parser().parse_args(['--runs', str(tmp_path), '--skip-teacher'])
    assert common.train_teacher(a)[1] == ckpt and a.preset == 'small'      # the reports print the teacher's
    with pytest.raises(ValueError, match='--preset tiny: the teacher in .* is small'):
        common.train_teacher(pipeline.build_parser().parse_args(['--runs', str(tmp_path), '--skip-teacher',
                                                                 '--preset', 'tiny']))


def test_pipeline_and_study_report_baselines_seeds_and_ratios(d8, tmp_path):
    data = d8
    runs = str(tmp_path / 'runs')
    common_flags = ['--runs', runs, '--teacher-steps', '3', '--batch', '16', '--decm-batch', '16', '--n', '20',
                    '--seeds', '0', '1', '--cfg-sweep', '1', '1.5', '--device', 'cpu', '--data', data, '--threads', '1']
    out = run_script('pipeline', *common_flags, '--apg-sweep', '1.5', '2', '--decm-steps', '2', '--jobs', '2')
    assert last_line(out) == (f'pipeline: wrote {runs}/pipeline.md, {runs}/pipeline.json, {runs}/pipeline.png; '
                              f'checkpoints in {runs}/teacher/ and {runs}/decm-s0, {runs}/decm-s1/')
    md = open(os.path.join(runs, 'pipeline.md')).read()
    raw = json.load(open(os.path.join(runs, 'pipeline.json')))
    fd = {(r['row'], r['nfe']): r['fd'] for r in raw['fd']}
    apgs = {w: fd[f'teacher, APG w = {w:g} (eta 0.05)', 50] for w in (1.5, 2.0)}
    best_w = min(apgs, key=lambda w: sum(apgs[w]))                      # DE-CM distils one step weaker (1 below 1.5)
    assert raw['w_cfg'] == {1.5: 1.0, 2.0: 1.5}[best_w] and raw['eta'] == 0.05 and raw['data'] == str(data)
    w = raw['w_cfg']
    assert (f'DE-CM distils APG w = {w:g} (the rule: one grid step weaker than the best APG setting swept, '
            f'w = {best_w:g}; w 1 when none is weaker).') in md
    for row in [f'| teacher, distilled velocity (APG w = {w:g}, eta 0.05) | 1', f'| teacher, distilled velocity '
                f'(APG w = {w:g}, eta 0.05) | 50', '| teacher, APG w = 1.5 (eta 0.05) | 50',
                '| teacher, APG w = 2 (eta 0.05) | 50', '| teacher, plain CFG w = 1 | 50',
                '| teacher, plain CFG w = 1.5 | 50', '| two sets of real data', '| DE-CM, CM sampler | 1',
                '| DE-CM, Mix sampler | 2', '| DE-CM, Mix sampler | 4']:
        line = [x for x in md.split('Ratios of DE-CM')[0].splitlines() if x.startswith(row + ' |')]
        assert len(line) == 1, (row, md)
        assert re.search(r'\d+\.\d\d \+- \d+\.\d\d \| \d+\.\d\d, \d+\.\d\d \|$', line[0]), line[0]   # 2 seeds
    assert fd[common.APG_KEY, 50] == pytest.approx(apgs[w] if w in apgs else fd['teacher, plain CFG w = 1', 50])
    teacher, t_stats, _ = sample.load_model(os.path.join(runs, 'teacher'))   # --jobs 2: the sweep ran in 2
    real1 = common.real_pixels(20, data, seed=101)[0]                   # processes, cell by cell as here
    one = common.fd_of(teacher, t_stats, 'teacher', 50, real1, 20, common.teacher_args(1.5, 'cfg'), 1, 'cpu')[0]
    assert fd['teacher, plain CFG w = 1.5', 50][1] == pytest.approx(float(one), abs=1e-9)
    assert all(os.path.exists(os.path.join(runs, 'logs', 'sweep', f'job00{k}.log')) for k in (0, 1))
    out = run_script('pipeline', *common_flags, '--apg-sweep', '1.5', '2', '--skip-teacher', '--sweep-only')
    assert last_line(out) == f'pipeline: wrote {runs}/sweep.md'      # the cached cells, no DE-CM run
    rows = [x for x in open(os.path.join(runs, 'sweep.md')).read().splitlines() if x.startswith('| teacher')]
    assert len(rows) == 4 and sum(x.endswith('| the best |') for x in rows) == 1, rows
    assert [x for x in rows if x.startswith('| teacher, plain CFG w = 1.5 |')][0].split(' | ')[2] == \
        ', '.join(f'{v:.3f}' for v in fd['teacher, plain CFG w = 1.5', 50])
    assert f'The best APG weight: {best_w:g}; DE-CM would distil one grid step weaker: {w:g}.' in out
    sweep = list(apgs.values()) + [fd[f'teacher, plain CFG w = {c}', 50] for c in ('1', '1.5')]
    best = min(sweep, key=lambda v: sum(v))                             # the teacher's best of all swept
    ratio = sum(a / b for a, b in zip(fd['DE-CM, CM sampler', 1], best)) / 2
    assert f'DE-CM at 1 NFE is {ratio:.3f}x' in md and raw['ratio_cm1'] == pytest.approx(ratio)
    assert raw['ratios']['cm1'] == pytest.approx([a / b for a, b in zip(fd['DE-CM, CM sampler', 1], best)])
    assert ('| / distilled-velocity teacher, 50 steps | / the teacher\'s best setting, 50 steps | differs from the '
            'teacher\'s best beyond noise? |') in md
    verdicts = [x.rsplit('|', 2)[1].strip() for x in md.split('Ratios of DE-CM')[1].splitlines()
                if x.startswith('| DE-CM, ')]
    assert len(verdicts) == 5 and all(v in ('no', 'yes: better', 'yes: worse') for v in verdicts), md   # 2 seeds
    assert 'Command: python experiments/pipeline.py --runs' in md
    ck = train.load_student_checkpoint(train.latest_checkpoint(os.path.join(runs, 'decm-s1')))
    assert ck['args']['r_max'] == 0.2 and ck['args']['ema_warmup'] and 'r_max 0.2' in md   # the study's defaults
    assert ck['args']['schedule'] == 'logit-normal' and 't schedule logit-normal' in md
    assert ck['args']['w_cfg'] == w and ck['args']['eta'] == 0.05
    teacher = train.load_student_checkpoint(train.latest_checkpoint(os.path.join(runs, 'teacher')))
    assert not teacher['args']['ema_warmup']                            # the recorded teachers' constant EMA
    assert 'the Mix sampler switches at t = 0.0625' in md                 # the Mix row samples at --mix-t
    with Image.open(os.path.join(runs, 'pipeline.png')) as im:
        im.verify()
    model, stats, _ = sample.load_model(os.path.join(runs, 'decm-s0'))
    real = common.real_pixels(20, data, seed=100)[0]
    fds = {t: float(common.fd_of(model, stats, 'mix', 4, real, 20, common.mix_args(t), 0, 'cpu')[0])
           for t in (0.0625, 0.25)}
    assert fds[0.0625] != fds[0.25] and abs(fd['DE-CM, Mix sampler', 4][0] - fds[0.0625]) < 1e-6, (fds, fd)
    mix2 = float(common.fd_of(model, stats, 'mix', 2, real, 20, common.mix_args(0.0625), 0, 'cpu')[0])
    assert abs(fd['DE-CM, Mix sampler', 2][0] - mix2) < 1e-6 and mix2 != fd['DE-CM, CM sampler', 2][0], (mix2, fd)
    published = os.path.join(common.RESULTS, 'pipeline.json')
    assert json.load(open(published))['n'] != 20                        # not published without --publish

    out = run_script('study', *common_flags, '--skip-teacher', '--configs', 'base', 'ew-rmax0.2', '--eval-at', '1',
                     '2', '--jobs', '2', '--results', tmp_path / 'res', '--seeds', '1')   # the later --seeds wins
    res = tmp_path / 'res'
    assert last_line(out) == f'study: wrote {res}/study.md, {res}/study.png (every run in study.md); runs in {runs}/'
    assert '## Every run' not in out and '| base | --lr 3e-4 | 2 |' in out   # printed: the summary
    md = (tmp_path / 'res' / 'study.md').read_text()
    every = [x for x in md.splitlines() if re.match(r'\| (base|ew-rmax0.2) \| 1 \| [12] \|', x)]
    assert len(every) == 2 * 2                                        # every run at every step is listed
    assert '| base | --lr 3e-4 | 2 |' in md and 'Command: python experiments/study.py' in md
    evals = json.load(open(os.path.join(runs, 'ew-rmax0.2-s1', 'evals.json')))
    assert all({'mix4', 'mix4_t0.0625', 'mix4_t0.125', 'cm1_raw'} <= set(evals[k]) for k in ('1', '2')), evals
    tfd = json.load(open(os.path.join(runs, 'teacher_fd.json')))          # the ratio to the teacher's best
    best = min(tfd[k] for k in [f'{common.APG_KEY}|50|1|20'] + [f'teacher, plain CFG w = {w}|50|1|20' for w in (1, 1.5)])
    cm1 = json.load(open(os.path.join(runs, 'base-s1', 'evals.json')))['2']['cm1']
    row = [x for x in md.splitlines() if x.startswith('| base | --lr 3e-4 | 2 |')][0]
    assert row.split(' | ')[6] == f'{cm1 / best:.3f}' and '| CM 1 / best |' in md, row
    base = train.load_student_checkpoint(train.latest_checkpoint(os.path.join(runs, 'base-s1')))['args']
    assert base['r_max'] == 0.05 and not base['ema_warmup'] and base['lr'] == 3e-4   # the study as recorded
    with Image.open(tmp_path / 'res' / 'study.png') as im:
        im.verify()


def test_outside_noise_is_paired_by_seed():
    """Rows of one seed share the real subset, which moves every row of that seed together: the test is on
    the per-seed differences. These are the pipeline's 2-NFE row and its teacher at 2,000 iterations: every
    seed is worse by 0.14-0.22, while the spread of the real subsets hides it from an unpaired test."""
    a, b = [1.68, 1.56, 1.44], [1.46, 1.42, 1.28]
    welch_se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3)
    assert statistics.fmean(a) - statistics.fmean(b) < 2 * welch_se      # unpaired: within noise
    assert common.outside_noise(a, b) and common.ordering(a, b) == 'worse' and common.ordering(b, a) == 'better'
    assert not common.outside_noise([1.0, 1.2, 1.1], [1.1, 1.1, 1.1])    # differences of both signs
    assert not common.outside_noise([2.0], [1.0])                         # one seed: nothing is outside the noise
    assert common.ordering([2.0], [1.0]) == common.ordering([1.0], [1.0]) == 'n/a (one seed)'   # and no test


def test_every_study_configuration_is_a_valid_change_of_train_flags():
    """A misspelt flag or a value equal to the run's own would make a study row silently repeat another.
    Each configuration is added to the study's DE-CM run (decm_argv, the 3e-4 lr of the study's part A, a
    constant EMA and r_max 0.05 as recorded); only 'base' restates that run."""
    a = argparse.Namespace(decm_batch=64, decm_lr=3e-4, w_cfg=2.0, eta=0.05, device='cpu', amp='off', data=None,
                           extra=[])
    argv = common.decm_argv(a, 'teacher.pt', 'out', 0, 10)
    ref = vars(train.parse_args(argv))
    assert ref['r_max'] == 0.05 and not ref['ema_warmup']
    names = [n for n, _, _ in study.STUDY]
    assert len(names) == len(set(names)) and 'facm' not in names and 'ew-cosine' not in names
    for name, desc, flags in study.STUDY:
        got = vars(train.parse_args(argv + flags))
        changed = {k for k in got if got[k] != ref[k]}
        assert bool(changed) == (name != 'base'), f'{name}: {flags} change {changed or "nothing"}'
        assert desc


# ----------------------------------------------------------------------------- speed, gpu, estimate, JVP dtype
def test_speed_writes_times_memory_and_ratios(background):
    out, tmp_path = background.result('speed')
    assert last_line(out) == f'speed: wrote {tmp_path}/speed.md, {tmp_path}/speed.json'
    md = (tmp_path / 'speed.md').read_text()
    assert md.strip() in out or 'DE-CM iteration / floor' in out
    for pattern in [r'DE-CM iteration / floor = (\d+\.\d+)', r'1-NFE sampling / one forward pass = (\d+\.\d+)',
                    r'/ FM iteration = (\d+\.\d+)']:
        m = re.search(pattern, md)
        assert m and float(m.group(1)) > 0, pattern
    assert re.search(r'\| tiny \| 0\.\d\dM \|', md)
    raw = json.loads((tmp_path / 'speed.json').read_text())['tiny']
    for k in ['fm', 'cm_fm', 'n2n_fm', 'decm', 'floor', 'forward', 'cm1', 'teacher50']:
        assert raw[k] > 0, k
    assert raw['decm'] > raw['fm'] and raw['teacher50'] > raw['cm1']
    assert raw['decm_mem'] is None or raw['decm_mem'] > 0


def test_gpu_search_time_limit_and_failed_rows():
    """gpu.py's parts: the batch search finds the largest batch that fits, a measurement over its time is
    stopped, and a failing measurement becomes a row with its error instead of ending the run."""
    for limit, cap in [(13, 1024), (64, 1024), (1, 8), (40, 24), (0, 8)]:
        seen = []
        fits = lambda B: seen.append(B) or B <= limit
        best, tried = gpu.largest_batch(fits, cap, deadline=time.perf_counter() + 60)
        assert best == min(limit, cap) and all(tried[B] == (B <= limit) for B in seen), (limit, cap, tried)
        assert len(seen) <= 2 * max(1, min(limit, cap)).bit_length() + 1
    t0 = time.perf_counter()
    with pytest.raises(gpu.OverBudget):
        gpu.time_limited(0.2, lambda: time.sleep(5))
    assert time.perf_counter() - t0 < 2
    assert gpu.time_limited(5, lambda: 7) == 7
    rows = []
    gpu.gpu_attempt(rows, 'fails', lambda: {'sec': 1 / 0}, torch.device('cpu'), 10)
    gpu.gpu_attempt(rows, 'works', lambda: {'sec': 0.5}, torch.device('cpu'), 10)
    assert rows[0]['name'] == 'fails' and rows[0]['error'].startswith('ZeroDivisionError')
    assert rows[1]['sec'] == 0.5 and 'error' not in rows[1]


def test_gpu_dry_run_on_cpu(background):
    """`gpu.py --device cpu --preset tiny`: every eager row measured, the batch searched, gpu.md/json."""
    out, tmp_path = background.result('gpu')
    assert last_line(out) == f'gpu: wrote {tmp_path}/gpu.md, {tmp_path}/gpu.json'
    raw = json.loads((tmp_path / 'gpu.json').read_text())
    assert raw['batch'] == 2 and raw['batch_search'] == {'1': True, '2': True}
    names = [r['name'] for r in raw['rows']]
    assert len(names) == 9 and all('error' not in r for r in raw['rows']), raw['rows']
    for r in raw['rows']:
        assert r['sec'] > 0 and r['flops'] > 0 and r['images_s'] == pytest.approx(2 / r['sec'])
    fwd, cm = raw['rows'][0]['flops'], raw['rows'][3]['flops']
    assert 2 < cm / fwd < 8                                             # a JVP + backward: a few forwards
    md = (tmp_path / 'gpu.md').read_text()
    assert md.count('\n| ') == 1 + 9 and 'FLOP floor' in md and 'DE-CM iteration, freq 3 average, bf16 JVP' in md
    assert raw['command'].startswith('python experiments/gpu.py --device cpu')


def test_estimate_writes_the_paper_scale_figures(background):
    out, tmp_path = background.result('estimate')
    assert last_line(out) == f'estimate: wrote {tmp_path}/estimate.md'
    text = (tmp_path / 'estimate.md').read_text()
    assert 'PFLOP' in text and 'hours' in text and 'GB of activations per sample' in text


def test_jvp_dtype_writes_the_error_table_and_the_short_runs(background):
    out, tmp_path = background.result('jvp_dtype')
    runs = tmp_path.parent / 'jvp_dtype_runs'
    assert last_line(out) == (f'jvp_dtype: wrote {tmp_path}/jvp_dtype.md, {tmp_path}/jvp_dtype.json; the teacher run '
                              f'in {runs}/teacher/')
    md = (tmp_path / 'jvp_dtype.md').read_text()
    assert '| tiny | CM (v, 1, 0) at (x_t, t, 1) |' in md and '| n2n |' in md
    raw = json.loads((tmp_path / 'jvp_dtype.json').read_text())
    assert len(raw['curves']['fp32']) == len(raw['curves']['bf16']) == 9


def test_jvp_dtype_error_against_float64():
    """--jvp-dtype: the fp32 JVP is float64's to single precision, the bf16 one (under bf16 autocast) to bf16's."""
    errs = jvp_dtype.jvp_errors('tiny', seed=0, B=4)
    for case in ('CM (v, 1, 0) at (x_t, t, 1)', 'N2N (v, 1, -1) at (x_r, r, t)'):
        assert errs[(case, 'fp32')][0] < 1e-5 and errs[(case, 'fp32')][1] < 1e-5, errs
        assert 1e-4 < errs[(case, 'bf16')][0] < 5e-2 and errs[(case, 'bf16')][1] < 5e-2, errs


# ----------------------------------------------------------------------------- figures, help, bad input
def test_figures_redraw_the_studys_plots_from_the_recorded_evaluations(tmp_path, capsys):
    for sub in ('study_gpu1', 'study_gpu2', 'study_cpu', 'study_cpu2', 'study_cpu3', 'study_cpu4', 'study_cpu5'):
        shutil.copytree(os.path.join(common.RESULTS, sub), tmp_path / sub, ignore=shutil.ignore_patterns('*.png', '*.md'))
    shutil.copy(os.path.join(common.RESULTS, 'pipeline_h200.json'), tmp_path)
    figures.main(['--results', str(tmp_path)])
    assert last_line(capsys.readouterr().out) == 'figures: wrote ' + ', '.join(f'{tmp_path}/{name}.png'
                                                                            for name in figures.FIGURES)
    for name in figures.FIGURES:
        with Image.open(tmp_path / f'{name}.png') as im:
            im.verify()
            assert im.format == 'PNG'


@pytest.mark.parametrize('name', list(SCRIPTS))
def test_every_script_says_what_it_measures(name, capsys):
    """--help: the docstring says what it measures and what it writes; exit code 0."""
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f'python experiments/{name}.py' in SCRIPTS[name].__doc__ and out.strip()


# id: (script, argv, substrings the error line must contain); every case is refused before any work
BAD = {
    'pipeline-unknown-flag': ('pipeline', ['--no-such-flag'], ['--no-such-flag']),
    'pipeline-n-1': ('pipeline', ['--n', '1'], ['--n 1', 'at least 2']),
    'pipeline-decm-steps-0': ('pipeline', ['--decm-steps', '0'], ['--decm-steps 0']),
    'pipeline-mix-t-1': ('pipeline', ['--mix-t', '1'], ['--mix-t']),
    'study-unknown-config': ('study', ['--configs', 'bogus'], ['unknown', 'bogus']),
    'study-facm-is-gone': ('study', ['--configs', 'facm'], ['unknown', 'facm']),
    'study-cosine-lr-is-gone': ('study', ['--configs', 'lr1e-3-cosine'], ['unknown', 'lr1e-3-cosine']),
    'study-jobs-0': ('study', ['--jobs', '0'], ['--jobs 0']),
    'regress-pairs-0': ('regress', ['--pairs', '0'], ['--pairs']),
    'regress-missing-teacher': ('regress', ['--teacher', '/nonexistent/teacher'], ['--teacher /nonexistent/teacher: no such']),
    'tables-without-g': ('tables', ['--rows', 'c', 'd'], ['with g']),
    'tables-n-1': ('tables', ['--n', '1'], ['--n 1']),
    'uci-digits-unwritable-out': ('uci_digits', ['--out', os.path.join(ROOT, 'README.md', 'x')], ['--out']),
    'tables-mix-t-1': ('tables', ['--mix-t', '1'], ['--mix-t']),
    'tables-unknown-schedule': ('tables', ['--schedule', 'cosine'], ['--schedule']),
    'mix-nfe-1': ('mix', ['--nfe', '1'], ['--nfe']),
    'mix-seeds-per-ckpt': ('mix', ['--ckpt', 'a', '--seeds', '0', '1'], ['one seed per --ckpt']),
    'speed-batch-0': ('speed', ['--batch', '0'], ['--batch']),
    'speed-unknown-preset': ('speed', ['--presets', 'huge'], ['--presets']),
    'jvp-dtype-seeds-0': ('jvp_dtype', ['--seeds', '0'], ['--seeds']),
    'gpu-unknown-preset': ('gpu', ['--preset', 'huge', '--device', 'cpu'], ['--preset huge']),
    'gpu-budget-0': ('gpu', ['--budget', '0', '--device', 'cpu'], ['--budget']),
    'estimate-unknown-preset': ('estimate', ['--preset', 'huge'], ['--preset']),
    'figures-unknown-figure': ('figures', ['--only', 'bogus'], ['--only']),
    'figures-missing-results': ('figures', ['--results', '/nonexistent/results'], ['--results']),
}
BAD.update({f'{name}-threads--1': (name, ['--threads', '-1'], ['--threads', '-1'])       # every torch-running script
            for name in SCRIPTS if name not in ('figures', 'uci_digits')})


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input(case, capsys):
    name, argv, must = BAD[case]
    one_error(capsys, lambda: SCRIPTS[name].main(argv), must)


def test_bad_input_from_the_command_line():
    """The same one line and exit code 2 from a fresh process, with no traceback."""
    p = subprocess.run([sys.executable, os.path.join(HERE, 'study.py'), '--configs', 'bogus'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: --configs'), p.stderr


def test_uci_digits_are_written_as_a_latents_folder(tmp_path, capsys):
    """experiments/uci_digits.py: scikit-learn's 1,797 real 8x8 digits as a latents folder train.py reads."""
    pytest.importorskip('sklearn')
    from sklearn.datasets import load_digits
    out = str(tmp_path / 'uci')
    uci_digits.main(['--out', out])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f'uci_digits: wrote {out}/')
    ds = train.LatentFolder(out)
    x, flip, y = ds[5]
    d = load_digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and sorted(set(ds.labels.tolist())) == list(range(10))
    assert torch.equal(x[0], torch.from_numpy(d.images[5]).float() / 8 - 1) and torch.equal(flip, x) and y == d.target[5]
