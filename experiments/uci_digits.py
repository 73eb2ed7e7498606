"""A second, real dataset: scikit-learn's bundled UCI handwritten digits, written as a latents folder.

    python experiments/uci_digits.py [--out data/uci_digits]

1,797 scans of handwritten digits 0-9 (8x8 pixels, 17 grey levels, 43 writers), bundled with scikit-learn (no
download). Written at their own size, 1 x 8 x 8, scaled to [-1, 1], in LightningDiT's latents format
(latents_rank00_shard000.safetensors with latents, latents_flip = latents, labels; latents_stats.pt), so that
`train.py --data data/uci_digits` and the experiments' `--data data/uci_digits` take them as they take the
built-in digits. Nothing in the project was tuned on them. scikit-learn is a dependency of this script only:
`pip install scikit-learn`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402


def write_uci_digits(out):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError('this script needs scikit-learn (pip install scikit-learn); the core does not')
    from safetensors.torch import save_file
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).mul(2).sub(1).unsqueeze(1).contiguous()   # 0..16 -> [-1, 1]
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--out {out}: cannot create the folder ({e.strerror})')
    path = os.path.join(out, 'latents_rank00_shard000.safetensors')
    save_file({'latents': x, 'latents_flip': x.clone(), 'labels': torch.from_numpy(d.target).long()}, path + '.tmp')
    os.replace(path + '.tmp', path)
    torch.save(train.latent_stats(x), os.path.join(out, 'latents_stats.pt'))
    return path, x.shape


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--out', default='data/uci_digits', help='the latents folder to write')
    return p


def main(argv=None):
    def run(a):
        path, shape = write_uci_digits(a.out)
        print(f'uci_digits: wrote {a.out}/ ({os.path.basename(path)}: {shape[0]} digits of {tuple(shape[1:])}, '
              f'latents_stats.pt)')
    return common.run_main(build_parser(), run, argv, 'uci_digits.py')


if __name__ == '__main__':
    main()
