import sys

from .allocator import tune
from .cli import main

tune()  # a job or command-line process: see osad_core/allocator.py
sys.exit(main())
