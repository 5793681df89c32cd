# Stand-in for botocore; see boto3/__init__.py.
