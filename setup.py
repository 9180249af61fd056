# Package metadata lives in settings.ini (nbdev 2); this file only reads it.
from configparser import ConfigParser
import shlex
import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + 'lib_name user branch license status min_python audience language'.split()
for key in expected: assert key in cfg, f'settings.ini is missing {key}'
setup_cfg = {key: cfg[key] for key in cfg_keys}

licenses = {
    'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License'),
    'mit': ('MIT License', 'OSI Approved :: MIT License'),
}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
status = {s.split(' - ')[0]: s for s in statuses}.get(cfg['status'])  # status = 3 is '3 - Alpha', not statuses[3]
assert status, f"settings.ini's status must be one of 1-7, not {cfg['status']!r}"
py_versions = '3.8 3.9 3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
if cfg.get('pip_requirements'): requirements += shlex.split(cfg.get('pip_requirements', ''))
min_python = cfg['min_python']
lic = licenses.get(cfg['license'].lower(), (cfg['license'], None))
dev_requirements = (cfg.get('dev_requirements') or '').split()
eval_requirements = (cfg.get('eval_requirements') or '').split()  # benchmarks of notebook 14: pip install epng[eval]
# running the notebooks: pip install epng[notebooks]; the evaluation notebooks (07, 09a-13) need the eval extra too
notebooks_requirements = (cfg.get('notebooks_requirements') or '').split() + eval_requirements

setuptools.setup(
    name=cfg['lib_name'],
    license=lic[0],
    classifiers=['Development Status :: ' + status,
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
        + ['Programming Language :: Python :: ' + v for v in py_versions[py_versions.index(min_python):]]
        + (['License :: ' + lic[1]] if lic[1] else []),
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['epng', 'epng.*']),
    include_package_data=True,
    package_data={'epng': ['fixtures/*', 'nano_model/*', 'nano_dense/*']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'eval': eval_requirements, 'notebooks': notebooks_requirements},
    dependency_links=cfg.get('dep_links', '').split(),
    python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={
        'console_scripts': cfg.get('console_scripts', '').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    **setup_cfg)
