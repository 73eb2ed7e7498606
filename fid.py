"""FID, the Frechet Inception Distance (Heusel et al., 2017), and the same distance on raw pixels (pixel_fd).

FID fits a Gaussian to the 2048-d InceptionV3 pool3 features of each of two image sets and reports their Frechet
distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The network is the "FID Inception" of the original FID code
with pytorch-fid's port of its weights, pt_inception-2015-12-05-6726825d.pth (never downloaded: pass --inception);
"FID quirk" marks where it differs from torchvision's. SAMPLES and REF are each a folder of .png/.jpg images of one
size, an ADM-style .npz of images (arr_0: uint8 NHWC, C = 1 or 3) or of statistics (keys mu and sigma).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    python fid.py data_dir --inception w.pth --save-stats data_stats.npz     # precompute REF statistics
"""
import argparse
import contextlib
import math
import os
import sys
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_NAME

class FIDError(ValueError):
    """A problem with the user's inputs; the command line prints it as one line and exits with code 2."""

# -------------------- Gaussian statistics and the Frechet distance
def sqrt_psd(sigma, name):
    """Symmetric square root of a covariance matrix by eigendecomposition (round-off negatives -> 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    if w.min() < -1e-6 * max(abs(w).max(), 1e-12):
        raise FIDError(f'{name} is not a covariance matrix (eigenvalue {w.min():.3g})')
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64, exact also for singular sigmas."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise FIDError(f'statistics do not match: mu {mu1.shape} and {mu2.shape}, sigma {s1.shape} and {s2.shape}')
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise FIDError('the statistics hold non-finite values')
    root1, _ = sqrt_psd(s1, 'sigma1'), sqrt_psd(s2, 'sigma2')     # both must be covariances
    a = root1 @ s2 @ root1          # tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), no sqrtm eps needed
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((a + a.T) / 2), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)

def few_samples_warning(n, d, what='FD'):
    """A one-line warning when n samples cannot estimate a D-dimensional covariance (n <= d), else None."""
    if n is not None and n <= d:
        return (f'warning: {what} from {n} samples of dimension {d}: with N <= D samples the covariance has rank at '
                f'most N - 1 < D, so it is singular and the distance is biased high; use clearly more samples')

def stats(features):
    """Mean and covariance (float64) of features of shape (N, D)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise FIDError(f'need at least 2 feature vectors of shape (N, D), got shape {features.shape}')
    return features.mean(0), np.cov(features, rowvar=False)

def accumulate(batches, total=None):
    """Mean and covariance (float64) of feature batches (B, D), summed on their device; total sizes the bar."""
    n, s, ss = 0, 0.0, 0.0
    with tqdm(total=total, unit='img', desc='inception features') as bar:
        for f in (torch.as_tensor(b).double() for b in batches):
            s, ss, n = s + f.sum(0), ss + f.T @ f, n + len(f)
            bar.update(len(f))
    if n < 2:
        raise FIDError(f'need at least 2 images, got {n}')
    mu = (s / n).cpu().numpy()
    return mu, (ss.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)     # unbiased, as np.cov

def pixel_fd(x, y):
    """Frechet distance of Gaussians fitted to the raw pixels of x, y (N, ...): not FID; see few_samples_warning."""
    x, y = (torch.as_tensor(a).detach().cpu().double().reshape(len(a), -1).numpy() for a in (x, y))
    return frechet_distance(*stats(x), *stats(y))

def save_stats(path, mu, sigma):
    """Writes statistics as an .npz with keys mu and sigma (the keys of ADM's reference batches)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))

def open_npz(path):
    """np.load of an .npz without pickles; a truncated or non-.npz file is a FIDError."""
    try:
        if zipfile.is_zipfile(path):                           # a cut-short .npz has lost its zip directory
            return np.load(path, allow_pickle=False)
        why = 'BadZipFile: truncated or another format'
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        why = f'{type(e).__name__}: {str(e)[:80]}'
    raise FIDError(f'{path} is not a complete, readable .npz archive ({why}); write it again (np.savez)')

def npz_array(f, key, path):
    """f[key] of an open .npz; an array of pickled Python objects or a damaged member is a FIDError."""
    if key not in f.files:
        raise FIDError(f'{path} has no {"images under " * (key == "arr_0")}{key} (keys: {", ".join(f.files)})')
    try:
        return f[key]
    except ValueError as e:                                    # object arrays need allow_pickle
        raise FIDError(f'{path}: {key} holds pickled Python objects, which are not loaded (not safe); store '
                       f'plain numeric arrays ({str(e)[:60]})')
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise FIDError(f'{path}: {key} cannot be read ({type(e).__name__}: {str(e)[:80]}); the file is damaged')

def load_stats(path):
    """Reads (mu, sigma) in float64 from an .npz with keys mu and sigma."""
    with open_npz(path) as f:
        mu, sigma = npz_array(f, 'mu', path).astype(np.float64), npz_array(f, 'sigma', path).astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f'{path}: its statistics hold non-finite values (NaN or inf); compute them again')
    return mu, sigma

def is_stats_file(path):
    """True for an .npz with keys mu and sigma, beside images or not (ADM's reference batches); damaged: FIDError."""
    if not (isinstance(path, str) and path.endswith('.npz') and os.path.isfile(path)):
        return False
    with open_npz(path) as f:
        return 'mu' in f.files and 'sigma' in f.files

# -------------------- The FID InceptionV3, in torchvision's names so that the weights load strictly (94 ConvBN + fc)
class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu = nn.ReLU(inplace=True)

class Units(nn.Module):
    """A module of ConvBN units, given in order as name=(cin, cout, kernel, stride=1, padding=0)."""

    def __init__(self, **specs):
        super().__init__()
        for name, spec in specs.items():
            setattr(self, name, ConvBN(*spec))

    def seq(self, x, branch, n):              # x through the units {branch}_1 .. {branch}_n in turn
        for i in range(1, n + 1):
            x = getattr(self, f'{branch}_{i}')(x)
        return x

def avg_pool_3x3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)    # FID quirk: TF ignores the padding

R7, C7, R3, C3 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))  # 1xk, kx1

class InceptionA(Units):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""

    def __init__(self, cin, pool_features):
        super().__init__(branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                         branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                         branch3x3dbl_3=(96, 96, 3, 1, 1), branch_pool=(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.seq(x, 'branch5x5', 2), self.seq(x, 'branch3x3dbl', 3),
                          self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionB(Units):
    """Reduction 35x35 -> 17x17 (Mixed_6a): strided 3x3, strided double 3x3 and max pool branches."""

    def __init__(self, cin):
        super().__init__(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                         branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.seq(x, 'branch3x3dbl', 3), F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(Units):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions (1x7 and 7x1) -> 768 channels."""

    def __init__(self, cin, c7):
        super().__init__(branch1x1=(cin, 192, 1), branch7x7_1=(cin, c7, 1), branch7x7_2=(c7, c7, *R7),
                         branch7x7_3=(c7, 192, *C7), branch7x7dbl_1=(cin, c7, 1), branch7x7dbl_2=(c7, c7, *C7),
                         branch7x7dbl_3=(c7, c7, *R7), branch7x7dbl_4=(c7, c7, *C7), branch7x7dbl_5=(c7, 192, *R7),
                         branch_pool=(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.seq(x, 'branch7x7', 3), self.seq(x, 'branch7x7dbl', 5),
                          self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionD(Units):
    """Reduction 17x17 -> 8x8 (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max pool branches."""

    def __init__(self, cin):
        super().__init__(branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                         branch7x7x3_2=(192, 192, *R7), branch7x7x3_3=(192, 192, *C7), branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        return torch.cat([self.seq(x, 'branch3x3', 2), self.seq(x, 'branch7x7x3', 4), F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(Units):
    """8x8 block (Mixed_7b/c): 3x3s split into 1x3 and 3x1 -> 2048 channels. FID quirk: Mixed_7c max-pools."""

    def __init__(self, cin, pool='avg'):
        super().__init__(branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *R3),
                         branch3x3_2b=(384, 384, *C3), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                         branch3x3dbl_3a=(384, 384, *R3), branch3x3dbl_3b=(384, 384, *C3), branch_pool=(cin, 192, 1))
        self.pool = pool

    def forward(self, x):
        b, c = self.branch3x3_1(x), self.seq(x, 'branch3x3dbl', 2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == 'max' else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c),
                          self.branch3x3dbl_3b(c), self.branch_pool(pooled)], 1)

class InceptionV3(Units):
    """FID InceptionV3: float RGB images in [0, 1], (N, 3, H, W) -> pool3 features (N, 2048)."""
    MIXED = ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c')

    def __init__(self):
        super().__init__(Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                         Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b, self.Mixed_6c = InceptionB(288), InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e, self.Mixed_7a = InceptionC(768, 160), InceptionC(768, 192), InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, pool='avg'), InceptionE(2048, pool='max')
        self.fc = nn.Linear(2048, 1008)     # the classifier is unused for FID; here so the weights load strictly

    def forward(self, x):
        x = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1     # 299x299, in [-1, 1]
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)   # 73x73x64
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)                      # 35x35x192
        for name in self.MIXED:
            x = getattr(self, f'Mixed_{name}')(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)      # pool3: (N, 2048)

def load_inception(path, device='cpu'):
    """InceptionV3 in eval mode on device, with the weights file at path loaded strictly."""
    if not path or not os.path.isfile(path):
        raise FIDError(f'Inception weights not found ({path!r}): FID needs the official {WEIGHTS_NAME}, published '
                       f'with the pytorch-fid releases on GitHub ({WEIGHTS_URL}); pass it with --inception PATH')
    not_it = f'{path} is not the FID Inception weights file ({WEIGHTS_NAME})'
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:                                     # keep torch's reason, not its advice
        lines = [l.strip() for l in str(e).split('WeightsUnpickler error:')[-1].splitlines() if l.strip()]
        raise FIDError(f'{not_it}: torch.load(weights_only=True) cannot read it as a file of tensors '
                       f'({(lines[0].split(". ")[0] if lines else type(e).__name__)[:200]})') from None
    if not isinstance(state, dict):
        raise FIDError(f'{not_it}: it holds a {type(state).__name__}, not a state dict')
    model = InceptionV3()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) if torch.is_tensor(v) else () for k, v in state.items()}
    problems = {'missing': [k for k in want if k not in got], 'unexpected': [k for k in got if k not in want],
                'wrong shape': [f'{k} {got[k]} (expected {want[k]})' for k in want if got.get(k, want[k]) != want[k]]}
    if any(problems.values()):
        raise FIDError(f'{not_it}: ' + '; '.join(f'{len(keys)} {name} key(s), e.g. {", ".join(map(str, keys[:3]))}'
                                                 for name, keys in problems.items() if keys))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()

# -------------------- Images
def image_files(folder):
    """Sorted .png/.jpg files of a folder (not recursive), checked to exist and to share one size."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise FIDError(f'no .png or .jpg images in {folder}')
    sizes = {}
    for f in files:
        try:
            with Image.open(f) as im:                     # reads the header only
                sizes.setdefault(im.size, f)
        except OSError as e:
            raise FIDError(f'cannot read image {f}: {e}')
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = sizes.items()
            raise FIDError(f'images in {folder} differ in size: {f1} is {s1[0]}x{s1[1]} but {f2} is {s2[0]}x{s2[1]}')
    return files

def read_images(files):
    """uint8 (N, H, W, 3) array of image files of one size (grayscale and palette become RGB, alpha is dropped)."""
    def rgb(f):
        with Image.open(f) as im:
            return np.asarray(im.convert('RGB'))
    return np.stack([rgb(f) for f in files])

def load_images(path):
    """uint8 (N, H, W, C) array, C = 1 or 3, of an image folder or of an ADM-style .npz (key arr_0)."""
    if os.path.isdir(path):
        return read_images(image_files(path))
    if not os.path.isfile(path):
        raise FIDError(f'{path} does not exist')
    if not str(path).endswith('.npz'):
        raise FIDError(f'{path} is neither a folder of images nor an .npz')
    with open_npz(path) as f:
        return check_images(npz_array(f, 'arr_0', path), f'{path}: arr_0')

def check_layout(dtype, shape, name):
    """Refuses images of a dtype and shape other than uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3."""
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise FIDError(f'{name} must be uint8 (N, H, W, C) with C = 1 or 3, got {dtype} {shape}')

def check_images(images, name='images'):
    """images as uint8 (N, H, W, C) with C = 1 or 3 ((N, H, W) gets C = 1), else a clear error."""
    images = np.asarray(images)
    check_layout(images.dtype, images.shape, name)
    return images[..., None] if images.ndim == 3 else images

def to_inception_input(images, device='cpu'):
    """uint8 (N, H, W, C) images, C = 1 or 3 -> float (N, 3, H, W) in [0, 1] on device."""
    x = torch.as_tensor(np.asarray(images)).to(device)    # move uint8, 4x smaller than float
    x = (x[..., None] if x.ndim == 3 else x).permute(0, 3, 1, 2).float() / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

def image_batches(source, batch_size=50, num_workers=0):
    """(count, uint8 NHWC batches) of an image folder (read by a DataLoader), an ADM-style .npz or a uint8 array."""
    if isinstance(source, str) and os.path.isdir(source):
        files = image_files(source)
        return len(files), torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=num_workers,
                                                       collate_fn=read_images)
    images = load_images(source) if isinstance(source, str) else check_images(source)
    return len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))

@torch.inference_mode()
def inception_stats(source, model, batch_size=50, num_workers=0, with_count=False):
    """(mu, sigma[, number of images]) of the pool3 features of an image folder, ADM .npz or uint8 NHWC array."""
    count, batches = image_batches(source, batch_size, num_workers)
    if count < 2:
        raise FIDError(f'need at least 2 images, {source if isinstance(source, str) else "the array"} has {count}')
    device = next(model.parameters()).device
    mu, sigma = accumulate((model(to_inception_input(b, device)) for b in batches), total=count)
    return (mu, sigma, count) if with_count else (mu, sigma)

def source_stats(source, model, batch_size=50, num_workers=0):
    """(mu, sigma, number of images) of a statistics .npz (number None) or of the Inception features of images."""
    if is_stats_file(source):
        return (*load_stats(source), None)
    return inception_stats(source, model, batch_size, num_workers, with_count=True)

def check_images_npz(path):
    """Refuses an image .npz without uint8 NHWC arr_0 before any network is loaded (reads only its header)."""
    fmt = np.lib.format
    with open_npz(path) as f:
        if 'arr_0' not in f.files:
            npz_array(f, 'arr_0', path)                        # the error that names the keys there are
        try:
            with f.zip.open('arr_0.npy') as m:
                read = fmt.read_array_header_1_0 if fmt.read_magic(m) == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(m)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, zlib.error) as e:
            raise FIDError(f'{path}: arr_0 cannot be read ({type(e).__name__}: {str(e)[:80]}); the file is damaged')
    if dtype.hasobject:
        raise FIDError(f'{path}: arr_0 holds pickled Python objects, which are not loaded (not safe); store '
                       f'uint8 images (N, H, W, C)')
    check_layout(dtype, shape, f'{path}: arr_0')

def needs_inception(*sources):
    """Whether any source holds images rather than statistics, after checking that paths and .npz files are fine."""
    for s in sources:
        if isinstance(s, str) and not os.path.exists(s):
            raise FIDError(f'{s} does not exist')
    images = [s for s in sources if not is_stats_file(s)]
    for s in images:
        if isinstance(s, str) and os.path.isfile(s):
            check_images_npz(s) if s.endswith('.npz') else load_images(s)   # the latter refuses a .png, a .txt
    return bool(images)

def save_npz(path, **arrays):
    """np.savez to a temporary file, then renamed into place: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path + '.tmp.npz', **arrays)
    os.replace(path + '.tmp.npz', path)

def write_adm_npz(path, images, labels=None, **extra):
    """ADM's sample file, the one load_images reads: arr_0 uint8 (N, H, W, C), arr_1 int64 labels (and extra). Atomic."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'write_adm_npz: expected uint8 NHWC images, got dtype {images.dtype} shape {images.shape}')
    labels = {} if labels is None else {'arr_1': np.asarray(labels).astype(np.int64).reshape(-1)}
    if labels and len(labels['arr_1']) != len(images):
        raise ValueError(f'write_adm_npz: {len(labels["arr_1"])} labels for {len(images)} images')
    save_npz(os.fspath(path), arr_0=images, **labels, **extra)

def latents_subset(folder, n, shape, builtin, flag='--fd-ref'):
    """The pixel FD's reference: n raw items, a fixed random subset (seed 1), of a latents folder (or builtin)."""
    from safetensors import safe_open
    path = builtin if folder == 'builtin' else folder
    files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors')) if os.path.isdir(path) else []
    if not files:
        raise FIDError(f'{flag} {folder}: not a latents folder (no *.safetensors files in {path})')
    slices = [safe_open(os.path.join(path, f), 'pt').get_slice('latents') for f in files]
    items = [(s, j) for s in slices for j in range(s.get_shape()[0])]
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(1))[:n].tolist()
    real = torch.stack([items[i][0][items[i][1]] for i in pick]).float()
    if tuple(real.shape[1:]) != tuple(shape):
        raise FIDError(f'{flag} {folder}: its items have shape {tuple(real.shape[1:])}, the samples {tuple(shape)}')
    return real

def pixels(source, n=None, shape=None):
    """--pixel, NCHW: a latents folder's n items as sample.py --fd-ref draws them, or sample.py's unrounded x, or images."""
    if os.path.isdir(source) and any(f.endswith('.safetensors') for f in os.listdir(source)):
        return latents_subset(source, n, shape, source, flag='REF').numpy()
    with contextlib.suppress(FIDError), open_npz(source) as f:
        if 'x' in f.files: return npz_array(f, 'x', source)
    return load_images(source).transpose(0, 3, 1, 2) / 127.5 - 1

# -------------------- Command line, and helpers shared by every script (fid.py imports nothing of ours)
def cli_parser(doc):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of usage + error."""
    ap = argparse.ArgumentParser(description=doc.split('\n\n')[0])
    ap.error = lambda msg: (print(f'error: {msg}', file=sys.stderr), sys.exit(2))
    return ap

def bounded(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: kind(text) in [lo, hi] (open at an end with lo_open / hi_open), else refused."""
    where = (f'{">" if lo_open else ">="} {lo:g}' if hi is None else
             f'in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}')
    def parse(text):
        with contextlib.suppress(ValueError):
            v = kind(text)
            if math.isfinite(v) and (lo is None or v > lo or v == lo and not lo_open) and \
                    (hi is None or v < hi or v == hi and not hi_open):
                return v
        raise argparse.ArgumentTypeError(f'{text} is not {"an integer" if kind is int else "a number"} {where}')
    return parse

def device_flag(text):
    """An argparse type for --device: auto, cpu, cuda or cuda:N (which must exist here)."""
    if text not in ['auto', 'cpu'] + ['cuda'] * torch.cuda.is_available() + [f'cuda:{i}' for i in range(torch.cuda.device_count())]:
        raise argparse.ArgumentTypeError(f'{text!r}: give auto, cpu, or a CUDA device this machine has (cuda, cuda:N)')
    return text

def flagged(flag, load, path, *args, **kwargs):
    """load(path, ...), its errors (which start with the path) prefixed by the flag the user typed."""
    try:
        return load(path, *args, **kwargs)
    except ValueError as e:
        raise ValueError(f'{flag} {e}' if str(e).startswith(str(path)) else f'{flag} {path}: {e}') from None

def run_cli(fn, *args):
    """fn(*args); a ValueError becomes one line `error: ...` and exit code 2 (no traceback)."""
    try:
        return fn(*args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)

def set_threads(n):
    """--threads N > 0 (torch's default, a spinning thread per core, can be 10-30x slower on a busy machine)."""
    if n > 0: torch.set_num_threads(n)

def main(argv=None):
    p = cli_parser('FID between two image sets (folders, ADM-style .npz, or stats .npz).')
    A = p.add_argument
    A('samples', help='generated images (a folder of .png/.jpg, an .npz with uint8 NHWC arr_0) or a stats .npz')
    A('ref', nargs='?', help='reference images or statistics, same formats (optional with --save-stats)')
    A('--inception', help=f'path to the weights file {WEIGHTS_NAME} (only needed for images)')
    A('--batch-size', type=bounded(int, 1), default=50, help='images per Inception forward pass (default: 50)')
    A('--device', type=device_flag, default='auto', help='auto (cuda if there is a GPU), cpu, cuda or cuda:N')
    A('--num-workers', type=bounded(int, 0), default=min(4, os.cpu_count() or 1), help='processes decoding image folders')
    A('--threads', type=bounded(int, 0), default=0, help='torch.set_num_threads (0: one per core; 1: faster on a busy machine)')
    A('--save-stats', metavar='OUT.npz', help='also write the statistics (mu, sigma) of SAMPLES')
    A('--pixel', action='store_true', help='the pixel FD of the samplers instead of FID (no Inception; REF may also be '
      'a latents folder)')
    args = p.parse_args(argv)
    if args.pixel and (args.inception or args.save_stats or args.ref is None):
        p.error('--pixel compares the raw pixels of SAMPLES and REF: give both, and neither --inception nor --save-stats')
    if args.ref is None and args.save_stats is None:
        p.error('REF is required unless --save-stats is given')
    if args.save_stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
        p.error(f'--save-stats {args.save_stats}: the folder does not exist')
    set_threads(args.threads)
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    try:
        if args.pixel:
            x = pixels(args.samples)
            print(f'pixel FD: {pixel_fd(x, pixels(args.ref, len(x), x.shape[1:])):.4f} ({len(x)} samples; not FID)')
            return
        sources = [s for s in (args.samples, args.ref) if s is not None]
        model = load_inception(args.inception, device) if needs_inception(*sources) else None
        mu1, sigma1, n1 = source_stats(args.samples, model, args.batch_size, args.num_workers)
        if args.save_stats:
            save_stats(args.save_stats, mu1, sigma1)
            print(f'saved statistics of {args.samples} to {args.save_stats}')
        if args.ref is not None:
            mu2, sigma2, n2 = source_stats(args.ref, model, args.batch_size, args.num_workers)
            value = frechet_distance(mu1, sigma1, mu2, sigma2)
            if n1 is not None or n2 is not None:
                print(f'features of {" against ".join(f"{n} images" if n else "stored statistics" for n in (n1, n2))}'
                      ' (published FIDs use 50,000 samples)')
            print(f'FID: {value:.4f}')
            for note in filter(None, (few_samples_warning(n, len(mu1), 'FID') for n in (n1, n2))):
                print(note, file=sys.stderr)
    except FIDError as e:
        p.error(str(e))

if __name__ == '__main__':
    main()
