"""Frechet Inception Distance (FID) and a pixel-space Frechet distance.

FID (Heusel et al., 2017) fits a Gaussian to the 2048-d pool3 features of InceptionV3 for each of two
image sets and reports the Frechet distance between the two Gaussians:

    FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

The network below is the "FID Inception": the 2015-12-05 TensorFlow InceptionV3 graph that the original
FID code used, with its weights ported to PyTorch in the file pt_inception-2015-12-05-6726825d.pth
(published by the pytorch-fid project). We never download it: pass its path with --inception.
Its few differences from torchvision's InceptionV3 are marked "FID quirk" below.

Inputs (SAMPLES and REF) may each be
  * a folder of .png / .jpg images, all of the same size,
  * an ADM-style .npz of images: key arr_0, uint8, shape (N, H, W, C) with C = 1 or 3,
  * a statistics .npz with keys mu and sigma (as in ADM's reference batches, e.g.
    VIRTUAL_imagenet256_labeled.npz; a file holding both images and mu/sigma is used as statistics).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
    python fid.py data_dir --inception w.pth --save-stats data_stats.npz     # precompute REF statistics

For the project's small built-in 16x16 dataset, pixel_fd() gives the same distance on raw pixels,
which needs no weights.
"""

import os
import pickle
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
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


class FIDError(ValueError):
    """A problem with the user's inputs; the command line prints it as one line and exits with code 2."""


# ---------------------------------------------------------------------------------------------------
# Gaussian statistics and the Frechet distance
# ---------------------------------------------------------------------------------------------------

def sqrt_psd(sigma, name):
    """Symmetric square root of a covariance matrix by eigendecomposition (round-off negatives -> 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    if w.min() < -1e-6 * max(abs(w).max(), 1e-12):
        raise FIDError(f'{name} is not a covariance matrix (eigenvalue {w.min():.3g})')
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the
    symmetric positive semi-definite A = S1^(1/2) S2 S1^(1/2). Two symmetric eigendecompositions give it
    exactly, also when S1 or S2 is singular (fewer samples than dimensions, pixels that never change), where
    scipy.linalg.sqrtm of the non-symmetric product S1 S2 warns (LinAlgWarning), needs an eps offset and may
    return a complex result. On well-conditioned statistics the two agree to round-off (test_all.py).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f'statistics do not match: mu {mu1.shape} and {mu2.shape}, '
                       f'sigma {sigma1.shape} and {sigma2.shape}')
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise FIDError('the statistics hold non-finite values')
    diff = mu1 - mu2
    root1 = sqrt_psd(sigma1, 'sigma1')
    sqrt_psd(sigma2, 'sigma2')                                 # checks that sigma2 is a covariance
    a = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((a + a.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


MIN_SAMPLES_NOTE = ('with N <= D samples the covariance has rank at most N - 1 < D, so it is singular and '
                    'the distance is biased high; use clearly more samples than dimensions')


def few_samples_warning(n, d, what='FD'):
    """A one-line warning when n samples cannot estimate a D-dimensional covariance (n <= d), else None."""
    if n is not None and n <= d:
        return f'warning: {what} from {n} samples of dimension {d}: {MIN_SAMPLES_NOTE}'
    return None


def stats(features):
    """Mean and covariance (float64) of features of shape (N, D)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise FIDError(f'need at least 2 feature vectors of shape (N, D), got shape {features.shape}')
    return features.mean(0), np.cov(features, rowvar=False)


def accumulate(batches, total=None):
    """Mean and covariance (float64) of feature batches (B, D), without keeping the features.

    Keeps the running sum and the sum of outer products on the batches' device, so a GPU does the
    (D x D) update. total, the number of vectors expected, only sizes the progress bar.
    """
    n, s, ss = 0, 0.0, 0.0
    with tqdm(total=total, unit='img', desc='inception features') as bar:
        for f in batches:
            f = torch.as_tensor(f).double()
            s = s + f.sum(0)
            ss = ss + f.T @ f
            n += len(f)
            bar.update(len(f))
    if n < 2:
        raise FIDError(f'need at least 2 images, got {n}')
    mu = (s / n).cpu().numpy()
    sigma = (ss.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)     # unbiased, as np.cov
    return mu, sigma


def pixel_fd(x, y):
    """Frechet distance between Gaussians fitted to raw pixel vectors of two image sets.

    x, y: arrays or tensors of shape (N, C, H, W) or (N, ...), any float scale as long as both share it.
    Each image is flattened to one vector (768 numbers for 3x16x16). This is a cheap, weights-free
    sanity metric for the project's small built-in 16x16 dataset; it is not FID and its values are not
    comparable with published FIDs. With fewer images than pixels the covariances are singular and the
    distance is biased high (few_samples_warning), so use many more images than pixels.
    """
    x = torch.as_tensor(x).detach().cpu().double().reshape(len(x), -1).numpy()
    y = torch.as_tensor(y).detach().cpu().double().reshape(len(y), -1).numpy()
    return frechet_distance(*stats(x), *stats(y))


def save_stats(path, mu, sigma):
    """Writes statistics as an .npz with keys mu and sigma (the keys of ADM's reference batches)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def open_npz(path):
    """np.load of an .npz without pickles; a truncated or non-.npz file is a FIDError."""
    if not zipfile.is_zipfile(path):                          # a cut-short .npz has lost its zip directory
        raise FIDError(f'{path} is not a complete .npz archive (BadZipFile: truncated or another format); '
                       f'write it again (np.savez)')
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise FIDError(f'{path} is not a readable .npz file ({type(e).__name__}: {str(e)[:80]}); '
                       f'write it again (np.savez)')


def npz_array(f, key, path):
    """f[key] of an open .npz; an array of pickled Python objects or a damaged member is a FIDError."""
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
        if 'mu' not in f.files or 'sigma' not in f.files:
            raise FIDError(f'{path} has no mu and sigma (keys: {", ".join(f.files)})')
        return npz_array(f, 'mu', path).astype(np.float64), npz_array(f, 'sigma', path).astype(np.float64)


def is_stats_file(path):
    """True for an .npz that holds keys mu and sigma (a damaged .npz is a FIDError)."""
    if not (isinstance(path, str) and path.endswith('.npz') and os.path.isfile(path)):
        return False
    with open_npz(path) as f:
        return 'mu' in f.files and 'sigma' in f.files


# ---------------------------------------------------------------------------------------------------
# The FID InceptionV3. Module and parameter names follow torchvision's InceptionV3, so that the
# weights file loads strictly: 94 conv+BN units with 6 entries each (conv.weight, bn.weight, bn.bias,
# bn.running_mean, bn.running_var, bn.num_batches_tracked) plus fc.weight and fc.bias = 566 keys.
# ---------------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def avg_pool_3x3(x):
    # FID quirk: TF's average pooling ignores the zero padding at the borders, hence count_include_pad=False.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Reduction 35x35 -> 17x17 (Mixed_6a): strided 3x3, strided double 3x3 and max pool branches."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions (1x7 and 7x1) -> 768 channels."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = conv(c)
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Reduction 17x17 -> 8x8 (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max pool branches."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, 3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) whose 3x3 branches split into parallel 1x3 and 3x1 -> 2048 channels.

    FID quirk: the pooled branch of Mixed_7c uses max pooling (pool='max'), not average pooling.
    """

    def __init__(self, cin, pool='avg'):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == 'max' else avg_pool_3x3(x)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], 1)


class InceptionV3(nn.Module):
    """FID InceptionV3: float RGB images in [0, 1], (N, 3, H, W) -> pool3 features (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)   # -> 35x35x256
        self.Mixed_5c = InceptionA(256, pool_features=64)   # -> 35x35x288
        self.Mixed_5d = InceptionA(288, pool_features=64)   # -> 35x35x288
        self.Mixed_6a = InceptionB(288)                     # -> 17x17x768
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)             # -> 17x17x768
        self.Mixed_7a = InceptionD(768)                     # -> 8x8x1280
        self.Mixed_7b = InceptionE(1280, pool='avg')        # -> 8x8x2048
        self.Mixed_7c = InceptionE(2048, pool='max')        # -> 8x8x2048
        # The 1008-way classifier is unused for FID; it exists so that the weights file loads strictly.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False, antialias=False)
        x = 2 * x - 1                                       # [0, 1] -> [-1, 1], the range the graph expects
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 299 -> 147x147x64
        x = F.max_pool2d(x, 3, stride=2)                                      # -> 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # -> 71x71x192
        x = F.max_pool2d(x, 3, stride=2)                                      # -> 35x35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)      # pool3: (N, 2048)


def load_inception(path, device='cpu'):
    """InceptionV3 in eval mode on device, with the weights file at path loaded strictly."""
    if not path or not os.path.isfile(path):
        raise FIDError(f'Inception weights not found ({path!r}): FID needs the official {WEIGHTS_NAME}, '
                       f'published with the pytorch-fid releases on GitHub ({WEIGHTS_URL}); '
                       f'pass its path with --inception PATH')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise FIDError(f'cannot read {path} as a PyTorch state dict: {str(e).strip().splitlines()[0]}')
    if not isinstance(state, dict):
        raise FIDError(f'{path} holds a {type(state).__name__}, not a state dict')
    model = InceptionV3()
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f'{k} {tuple(getattr(state[k], "shape", ()))} (expected {tuple(v.shape)})' for k, v in want.items()
             if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)]
    problems = [(name, keys) for name, keys in
                [('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)] if keys]
    if problems:
        raise FIDError(f'{path} is not the FID Inception weights file ({WEIGHTS_NAME}): ' + '; '.join(
            f'{len(keys)} {name} key(s), e.g. {", ".join(keys[:3])}' for name, keys in problems))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------

def image_files(folder):
    """Sorted .png/.jpg files of a folder (not recursive), checked to exist and to share one size."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
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


def read_image(file):
    """uint8 (H, W, 3) array of one image file; grayscale and palette images become RGB, alpha is dropped."""
    with Image.open(file) as im:
        return np.asarray(im.convert('RGB'))


def read_images(files):
    """uint8 (N, H, W, 3) array of image files of one size."""
    return np.stack([read_image(f) for f in files])


def load_images(path):
    """uint8 (N, H, W, C) array, C = 1 or 3, of an image folder or of an ADM-style .npz (key arr_0)."""
    if os.path.isdir(path):
        return read_images(image_files(path))
    if not os.path.isfile(path):
        raise FIDError(f'{path} does not exist')
    if not str(path).endswith('.npz'):
        raise FIDError(f'{path} is neither a folder of images nor an .npz')
    with open_npz(path) as f:
        if 'arr_0' not in f.files:
            raise FIDError(f'{path} has no images under arr_0 (keys: {", ".join(f.files)})')
        return check_images(npz_array(f, 'arr_0', path), f'{path}: arr_0')


def check_images(images, name='images'):
    """images as uint8 (N, H, W, C) with C = 1 or 3 ((N, H, W) gets C = 1), else a clear error."""
    images = np.asarray(images)
    if images.ndim == 3:                                  # (N, H, W): grayscale
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise FIDError(f'{name} must be uint8 (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}')
    return images


def to_inception_input(images, device='cpu'):
    """uint8 (N, H, W, C) images, C = 1 or 3 -> float (N, 3, H, W) in [0, 1] on device."""
    x = torch.as_tensor(np.asarray(images)).to(device)    # move uint8, 4x smaller than float
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2).float() / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def image_batches(source, batch_size=50, num_workers=0):
    """(count, iterable of uint8 NHWC batches) for an image folder, an ADM-style .npz or a uint8 array.

    Folders are decoded lazily by a DataLoader with num_workers processes; arrays are sliced.
    """
    if isinstance(source, str) and os.path.isdir(source):
        files = image_files(source)
        loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=read_images)
        return len(files), loader
    images = load_images(source) if isinstance(source, str) else check_images(source)
    return len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))


@torch.inference_mode()
def inception_stats(source, model, batch_size=50, num_workers=0, with_count=False):
    """(mu, sigma) of the pool3 features of an image folder, an ADM-style .npz or a uint8 NHWC array
    (and the number of images, with_count)."""
    count, batches = image_batches(source, batch_size, num_workers)
    if count < 2:
        raise FIDError(f'need at least 2 images, {source if isinstance(source, str) else "the array"} has {count}')
    device = next(model.parameters()).device
    mu, sigma = accumulate((model(to_inception_input(b, device)) for b in batches), total=count)
    return (mu, sigma, count) if with_count else (mu, sigma)


def source_stats(source, model, batch_size=50, num_workers=0):
    """(mu, sigma, number of images) of a statistics .npz (number None: not stored) or of the Inception
    features of images (model is then needed)."""
    if is_stats_file(source):
        return (*load_stats(source), None)
    return inception_stats(source, model, batch_size, num_workers, with_count=True)


def check_images_npz(path):
    """Reads only the header of arr_0 in an image .npz: a missing arr_0, pickled objects or a dtype or shape
    that is not uint8 NHWC are refused before any network is loaded."""
    with open_npz(path) as f:
        if 'arr_0' not in f.files:
            raise FIDError(f'{path} has no images under arr_0 (keys: {", ".join(f.files)})')
    try:
        with zipfile.ZipFile(path) as z, z.open('arr_0.npy') as m:
            version = np.lib.format.read_magic(m)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(m)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, zlib.error) as e:
        raise FIDError(f'{path}: arr_0 cannot be read ({type(e).__name__}: {str(e)[:80]}); the file is damaged')
    if dtype.hasobject:
        raise FIDError(f'{path}: arr_0 holds pickled Python objects, which are not loaded (not safe); store '
                       f'uint8 images (N, H, W, C)')
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise FIDError(f'{path}: arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, got {dtype} {shape}')


def needs_inception(*sources):
    """Whether any source holds images rather than statistics; first checks that the paths exist and that
    the .npz files can be read."""
    for s in sources:
        if isinstance(s, str) and not os.path.exists(s):
            raise FIDError(f'{s} does not exist')
    images = [s for s in sources if not is_stats_file(s)]
    for s in images:
        if isinstance(s, str) and os.path.isfile(s) and s.endswith('.npz'):
            check_images_npz(s)
    return bool(images)


def fid_of(samples, ref, inception_path=None, batch_size=50, device='cpu', num_workers=0):
    """FID between two sources, each an image folder, an ADM-style .npz, a uint8 NHWC array or a stats .npz.

    The weights file is only needed (and only loaded) when a source holds images.
    """
    samples, ref = (os.fspath(s) if isinstance(s, os.PathLike) else s for s in (samples, ref))
    model = load_inception(inception_path, device) if needs_inception(samples, ref) else None
    mu1, sigma1, _ = source_stats(samples, model, batch_size, num_workers)
    mu2, sigma2, _ = source_stats(ref, model, batch_size, num_workers)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def main():
    from train import cli_parser, bounded, device_flag, set_threads
    p = cli_parser('FID between two image sets (folders, ADM-style .npz, or statistics .npz with mu and sigma).')
    p.add_argument('samples', help='generated images: a folder of .png/.jpg, an .npz with uint8 arr_0 '
                                   '(N, H, W, C), or an .npz with mu and sigma')
    p.add_argument('ref', nargs='?', default=None,
                   help='reference images or statistics, same formats (may be left out with --save-stats)')
    p.add_argument('--inception', default=None,
                   help=f'path to the weights file {WEIGHTS_NAME} (default: none; only needed for images)')
    p.add_argument('--batch-size', type=bounded(int, 1), default=50,
                   help='images per Inception forward pass (default: 50)')
    p.add_argument('--device', type=device_flag, default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='torch device, e.g. cpu or cuda (default: cuda if available, else cpu)')
    p.add_argument('--num-workers', type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
                   help='processes decoding image folders (default: min(4, number of CPUs))')
    p.add_argument('--threads', type=bounded(int, 0), default=0,
                   help='torch.set_num_threads (0: the default, one per core; 1 is faster on a busy machine)')
    p.add_argument('--save-stats', default=None, metavar='OUT.npz',
                   help='also write the statistics (mu, sigma) of SAMPLES to OUT.npz (default: none)')
    args = p.parse_args()
    if args.ref is None and args.save_stats is None:
        p.error('REF is required unless --save-stats is given')
    if args.save_stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
        p.error(f'--save-stats {args.save_stats}: the folder does not exist')
    set_threads(args.threads)
    device = 'cpu' if args.device == 'auto' and not torch.cuda.is_available() else \
        ('cuda' if args.device == 'auto' else args.device)

    try:
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
                print('features of ' + ' against '.join(f'{n} images' if n is not None else 'stored statistics'
                                                        for n in (n1, n2)) +
                      ' (published FIDs use 50,000 samples against the reference batch)')
            print(f'FID: {value:.4f}')
            for n in (n1, n2):
                note = few_samples_warning(n, len(mu1), 'FID')
                if note:
                    print(note, file=sys.stderr)
    except FIDError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
