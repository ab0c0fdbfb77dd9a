"""The ``s3`` tier: chunks as objects in an S3 bucket (AWS, SeaweedFS, MinIO, ...).

``plugin`` registers it cheaply; ``config`` holds the pydantic options; ``backend`` imports boto3.
"""

__all__: list[str] = []
