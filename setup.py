from setuptools import setup

with open("txcluster/_version.py") as f:
    version = f.read().split('"')[1]

with open("README.md", encoding="utf-8") as f:
    readme = f.read()

setup(
    name="txcluster",
    version=version,
    description="Node.js cluster for Twisted: one master shares its sockets with N worker processes",
    long_description=readme,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["txcluster", "twisted.plugins"],
    package_data={"twisted": ["plugins/txcluster_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.10",
        "zope.interface",
    ],
    extras_require={
        "proctitle": ["setproctitle"],
        "test": ["treq", "hypothesis", "setproctitle"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
