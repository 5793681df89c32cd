# The exception classes Debian's nbdkit-S3-plugin imports from botocore.


class ClientError(Exception):
    def __init__(self, error_response, operation_name):
        super().__init__("%s: %s" % (operation_name, error_response))
        self.response = error_response
        self.operation_name = operation_name


class ReadTimeoutError(Exception):
    pass


class ConnectTimeoutError(Exception):
    pass


class ConnectionClosedError(Exception):
    pass
