fn main() {
    for f in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&f).unwrap();
        let cpu = altpatch::cpu::RecordedCpuid::parse(&text).unwrap();
        println!("{f}: {}", altpatch::cpu::Features::from_source(&cpu));
    }
    println!("host: {}", altpatch::cpu::Features::detect());
    print!("{}", altpatch::cpu::dump(&altpatch::cpu::HostCpuid::new()));
}
