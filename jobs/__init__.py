"""The job YAMLs of this folder, installed as the package ``dinor1.jobs`` (package data) so that
``dinor1 train grqo`` finds them without a checkout; see :mod:`dinor1.jobs_index`."""
