"""Command-line entry point of a checkout: ``python main.py --feature_type resnet ...``, the same
as the installed ``video-features`` command (video_features/cli.py)."""
from video_features.cli import entry

if __name__ == "__main__":
    entry()
