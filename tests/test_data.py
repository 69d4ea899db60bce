"SynthSigns: determinism, boxes around the sign, balanced classes, the GTSRB reader, bad input."
import numpy as np, pandas as pd, pytest
from pathlib import Path
from fastai_saliency.data import render_sign, synth_signs, read_boxes, read_gtsrb, synth_signs_dls, SIGN_CLASSES

def test_render_deterministic_and_seed_dependent():
    a,ba = render_sign(3, size=64, seed=7)
    b,bb = render_sign(3, size=64, seed=7)
    c,bc = render_sign(3, size=64, seed=8)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and ba == bb
    assert not np.array_equal(np.asarray(a), np.asarray(c))

@pytest.mark.parametrize('size', [32, 64, 128, 224])
def test_box_inside_image_and_around_the_sign(size):
    for label in range(len(SIGN_CLASSES)):
        img,(x1,y1,x2,y2) = render_sign(label, size=size, seed=label)
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        assert (x2-x1) >= 0.15*size and (y2-y1) >= 0.15*size        # radius >= 0.12 of the side
        # the same image without the sign: the pixels that differ are the sign's
        bare = render_sign(label, size=size, seed=label, sign=False)[0]
        diff = np.abs(np.asarray(img).astype(int) - np.asarray(bare).astype(int)).sum(-1) > 40
        ys,xs = np.nonzero(diff)
        m = 1 + 0.02*size                                                  # resampling blurs edges by about a pixel
        inside = (xs+1 > x1-m) & (xs < x2+m) & (ys+1 > y1-m) & (ys < y2+m)
        assert inside.mean() > 0.99, (label, inside.mean())            # the sign lies in its box
        assert diff.sum() > 0.3*(x2-x1)*(y2-y1)                           # and fills a good part of it
        tol = 0.08*size + 1                                                # the box is tight around it
        assert xs.min() <= x1+tol and xs.max() >= x2-1-tol and ys.min() <= y1+tol and ys.max() >= y2-1-tol

def test_obstacle_box_near_a_lower_corner():
    for seed in range(6):
        img,box,(ox1,oy1,ox2,oy2) = render_sign(5, size=64, seed=seed, obstacle_box=True)
        without = np.asarray(render_sign(5, size=64, seed=seed, obstacle=False)[0]).astype(int)
        diff = np.abs(np.asarray(img).astype(int) - without).sum(-1) > 60
        # the obstacle is all that differs, minus what the sign covers
        signmask = np.zeros_like(diff); x1,y1,x2,y2 = (int(round(v)) for v in box); signmask[y1:y2+1, x1:x2+1] = True
        ys,xs = np.nonzero(diff & ~signmask)
        assert len(ys) > 20
        assert ((xs >= ox1-1) & (xs <= ox2) & (ys >= oy1-1) & (ys <= oy2)).mean() > 0.99
        assert oy1 > 0.5*64 and (ox2 < 0.5*64 or ox1 > 0.5*64)                 # a lower corner
        assert render_sign(5, size=64, seed=seed)[1] == box                      # the same sign either way

def test_synth_signs_balanced_and_reproducible(tmp_path):
    p = synth_signs(tmp_path/'a', n_per_class=5, size=32, seed=3, n_classes=12)
    df = read_boxes(p)
    assert list(df.columns) == ['fname', 'label', 'x1', 'y1', 'x2', 'y2', 'is_valid', 'ox1', 'oy1', 'ox2', 'oy2']
    assert len(df) == 60 and set(df.label.value_counts()) == {5}
    assert df.groupby('label').is_valid.sum().tolist() == [1]*12
    assert all((p/f).exists() for f in df.fname)
    q = synth_signs(tmp_path/'b', n_per_class=5, size=32, seed=3, n_classes=12)
    assert (p/'labels.csv').read_text() == (q/'labels.csv').read_text()
    assert all((p/f).read_bytes() == (q/f).read_bytes() for f in df.fname)
    r = synth_signs(tmp_path/'c', n_per_class=5, size=32, seed=4, n_classes=12)
    assert (p/'labels.csv').read_text() != (r/'labels.csv').read_text()

def test_dls_learnable_shapes(tmp_path):
    p = synth_signs(tmp_path/'a', n_per_class=4, size=32, seed=0, n_classes=8)
    dls = synth_signs_dls(p, bs=4, num_workers=0)
    xb,yb = dls.one_batch()
    assert tuple(xb.shape) == (4, 3, 32, 32) and dls.c == 8
    assert abs(float(xb.mean())) < 2                   # normalised

@pytest.mark.parametrize('kwargs,msg', [
    (dict(n_per_class=0), 'n_per_class must be an int >= 1'),
    (dict(n_per_class=2.5), 'n_per_class must be an int >= 1'),
    (dict(size=15), 'size must be between 16'),
    (dict(n_classes=1), 'n_classes must be in 2..12'),
    (dict(valid_pct=1.0), 'valid_pct must be in'),
])
def test_bad_input(tmp_path, kwargs, msg):
    with pytest.raises(ValueError, match=msg): synth_signs(tmp_path/'x', **kwargs)

def test_dest_holding_something_else(tmp_path):
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'thesis.tex').write_text('x')
    with pytest.raises(ValueError, match='not empty and holds no SynthSigns'): synth_signs(tmp_path/'mine')
    (tmp_path/'file').write_text('x')
    with pytest.raises(ValueError, match='is not a folder'): synth_signs(tmp_path/'file')
    assert (tmp_path/'mine'/'thesis.tex').read_text() == 'x'

def _write_gtsrb(root):
    rows = {0: [('00000_00000.ppm', 30, 31, 5, 6, 25, 26), ('00000_00001.ppm', 40, 42, 4, 5, 35, 36)],
            14: [('00001_00000.ppm', 50, 50, 6, 7, 44, 45)]}
    for cls,items in rows.items():
        d = root/f'{cls:05d}'; d.mkdir(parents=True)
        lines = ['Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId']
        for fn,w,h,x1,y1,x2,y2 in items:
            render_sign(0, size=w, seed=1)[0].resize((w, h)).save(d/fn)
            lines.append(f'{fn};{w};{h};{x1};{y1};{x2};{y2};{cls}')
        (d/f'GT-{cls:05d}.csv').write_text('\n'.join(lines) + '\n')
    return rows

def test_read_gtsrb_fields(tmp_path):
    rows = _write_gtsrb(tmp_path/'GTSRB')
    df = read_gtsrb(tmp_path/'GTSRB', valid_pct=0.5, seed=0)
    assert list(df.columns) == ['fname', 'label', 'x1', 'y1', 'x2', 'y2', 'is_valid', 'width', 'height']
    assert df.fname.tolist() == ['00000/00000_00000.ppm', '00000/00000_00001.ppm', '00014/00001_00000.ppm']
    assert df.label.tolist() == [0, 0, 14]
    assert df[['x1', 'y1', 'x2', 'y2']].values.tolist() == [[5, 6, 25, 26], [4, 5, 35, 36], [6, 7, 44, 45]]
    assert df.width.tolist() == [30, 40, 50] and df.height.tolist() == [31, 42, 50]
    assert set(df.is_valid) <= {0, 1}
    assert all((tmp_path/'GTSRB'/f).exists() for f in df.fname)

def test_read_gtsrb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no GT-'): read_gtsrb(tmp_path)
    d = tmp_path/'00003'; d.mkdir()
    (d/'GT-00003.csv').write_text('Filename;ClassId\na.ppm;3\n')
    with pytest.raises(ValueError, match='lacks columns'): read_gtsrb(tmp_path)
